"""The Events page's content: the AsyncAPI catalogue as people read it, with live
counts per stream and the event versions in flight."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import redis.asyncio as aioredis
from markupsafe import Markup, escape

from orderflow.config import Settings
from orderflow.contracts.asyncapi import MESSAGES, asyncapi_document
from orderflow.contracts.inflight import versions_in_flight


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


_CODE_SPAN = re.compile(r"`([^`]+)`")


def code_spans(text: str) -> Markup:
    """``text`` escaped, its Markdown `code spans` as <code> (the document's prose)."""
    parts = _CODE_SPAN.split(text)  # plain, code, plain, code, ...
    return Markup("").join(
        Markup("<code>{}</code>").format(part) if odd else escape(part)
        for odd, part in zip(itertools.cycle((False, True)), parts, strict=False)
    )


def catalogue(settings: Settings) -> dict[str, Any]:
    """Channels, messages and operations of the document, ready for the template."""
    document = asyncapi_document(settings)
    operations: dict[str, list[dict[str, str]]] = {}
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"].rsplit("/", 1)[1]
        for ref in operation["messages"]:
            key = ref["$ref"].rsplit("/", 1)[1]
            operations.setdefault(key, []).append(
                {
                    "service": operation["tags"][0]["name"],
                    "action": operation["action"],
                    "address": document["channels"][channel]["address"],
                    "channel": document["channels"][channel]["title"],
                }
            )
    streams = {settings.stream, settings.email_events_stream}
    channels = []
    for key, channel in document["channels"].items():
        counted = None
        if key == "orders" or key == "ordersPartition":
            counted = settings.stream
        elif key == "emailEvents":
            counted = settings.email_events_stream
        channels.append(
            {
                "key": key,
                "title": channel["title"],
                "address": channel["address"],
                "description": channel["description"],
                "messages": list(channel["messages"]),
                "stream": counted if counted in streams else None,
                "dead_letters_of": settings.stream if key == "ordersDeadLetters" else None,
            }
        )
    messages = []
    for spec in MESSAGES:
        message = document["components"]["messages"][spec.key]
        example = message["examples"][0] if message["examples"] else {}
        messages.append(
            {
                "key": spec.key,
                "title": message["title"],
                "summary": message["summary"],
                "dataschema": spec.dataschema,
                "operations": operations.get(spec.key, []),
                "payload": _pretty(spec.model.model_json_schema()),
                "headers": _pretty(message["headers"]) if "headers" in message else None,
                "example": _pretty(example.get("payload", {})),
                "example_headers": _pretty(example["headers"]) if "headers" in example else None,
            }
        )
    return {
        "asyncapi": document["asyncapi"],
        "version": document["info"]["version"],
        "channels": channels,
        "messages": messages,
    }


async def in_flight(redis: aioredis.Redis, settings: Settings) -> dict[str, dict[str, int]]:
    """The versions among the newest entries of each stream."""
    return {
        stream: await versions_in_flight(redis, stream)
        for stream in (settings.stream, settings.email_events_stream)
    }
