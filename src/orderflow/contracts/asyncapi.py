"""The AsyncAPI 3.0.0 document of orderflow's events, generated from the code.

Each payload schema is the ``model_json_schema()`` of the pydantic model that builds or
validates that payload (one source: nothing here restates a field). The document names
the channels (the ``orders`` stream, its cluster partitions ``{orders:N}``, the dead
letters, ``email-events`` and the Pub/Sub channel), each message in each version, and
which service sends and which receives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import yaml
from pydantic import BaseModel

from orderflow.config import Settings
from orderflow.contracts.records import CloudEventFields, DeadLetter
from orderflow.domain import (
    DATASCHEMA_FIELD,
    EMAIL_FAILED_EVENT,
    EMAIL_SENT_EVENT,
    ORDER_CREATED_EVENT,
    dataschema,
)
from orderflow.email.events import EmailFailed, EmailSent
from orderflow.email.order import OrderCreatedV1, OrderCreatedV2

ASYNCAPI_VERSION = "3.0.0"
#: The pseudo event type of a dead letter (not a CloudEvent of its own).
DEAD_LETTER = "dead-letter"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One message of the catalogue: an event type in one version, and its model."""

    #: Key under ``components.messages``.
    key: str
    event_type: str
    version: int
    model: type[BaseModel]
    #: The CloudEvents ``ce_source`` of its producer (None: not a CloudEvent).
    source: str | None
    summary: str

    @property
    def dataschema(self) -> str | None:
        """The ``ce_dataschema`` it carries (None for version 1: absent means 1)."""
        return dataschema(self.event_type, self.version) if self.version > 1 else None


#: Every message orderflow publishes or reads, each version its own entry.
MESSAGES: tuple[MessageSpec, ...] = (
    MessageSpec(
        "orderCreatedV1",
        ORDER_CREATED_EVENT,
        1,
        OrderCreatedV1,
        "orderflow/orders",
        "A new order, version 1: flat (email, total, items); no ce_dataschema.",
    ),
    MessageSpec(
        "orderCreatedV2",
        ORDER_CREATED_EVENT,
        2,
        OrderCreatedV2,
        "orderflow/orders",
        "A new order, version 2: customer, lines with unit prices, total = their sum.",
    ),
    MessageSpec(
        "emailSent",
        EMAIL_SENT_EVENT,
        1,
        EmailSent,
        "orderflow/email",
        "The order's confirmation was accepted by the SMTP server.",
    ),
    MessageSpec(
        "emailFailed",
        EMAIL_FAILED_EVENT,
        1,
        EmailFailed,
        "orderflow/email",
        "The order's confirmation cannot be sent (invalid order, refused, gave up).",
    ),
    MessageSpec(
        "deadLetter",
        DEAD_LETTER,
        1,
        DeadLetter,
        None,
        "An orders entry the Email Service gave up on, with why, when and where from.",
    ),
)


def message_spec(event_type: str, version: int) -> MessageSpec:
    """The catalogue's message for ``event_type`` version ``version``; KeyError if none."""
    for spec in MESSAGES:
        if spec.event_type == event_type and spec.version == version:
            return spec
    raise KeyError(f"no {event_type} version {version} in the catalogue")


def _package_version() -> str:
    try:
        return version("orderflow")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0.0.0"


def _schemas(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Add ``model``'s schema (and the models it uses) to ``schemas``; its $ref."""
    schema = model.model_json_schema(ref_template=_REF)
    for name, definition in schema.pop("$defs", {}).items():
        if schemas.setdefault(name, definition) != definition:
            raise ValueError(f"two different models are both called {name}")
    name = schema.get("title", model.__name__)
    schemas[name] = schema
    return {"$ref": _REF.format(model=name)}


def _headers_schema(spec: MessageSpec) -> dict[str, Any]:
    """The CloudEvents headers of ``spec``: the common fields, with its type, source
    and version fixed."""
    schema = CloudEventFields.model_json_schema(by_alias=True)
    schema["title"] = f"{spec.key}Headers"
    properties = schema["properties"]
    properties["ce_type"] = {
        **properties["ce_type"],
        "description": f"{spec.event_type} (the default when absent on the orders stream)",
        "enum": [spec.event_type],
    }
    properties["ce_source"] = {**properties["ce_source"], "enum": [spec.source]}
    if spec.dataschema is None:
        properties[DATASCHEMA_FIELD] = {
            "description": "Absent: version 1.",
            "not": {},
        }
    else:
        properties[DATASCHEMA_FIELD] = {**properties[DATASCHEMA_FIELD], "enum": [spec.dataschema]}
        schema["required"] = [DATASCHEMA_FIELD]
    return schema


def _message(spec: MessageSpec, schemas: dict[str, Any]) -> dict[str, Any]:
    payload = _schemas(schemas, spec.model)
    examples: list[dict[str, Any]] = []
    for example in (spec.model.model_json_schema().get("examples") or [])[:1]:
        entry: dict[str, Any] = {"name": f"{spec.key}Example", "payload": example}
        if spec.source is not None:
            headers = {"ce_type": spec.event_type, "ce_source": spec.source}
            if spec.dataschema is not None:
                headers[DATASCHEMA_FIELD] = spec.dataschema
            entry["headers"] = headers
        examples.append(entry)
    message: dict[str, Any] = {
        "name": spec.event_type,
        "title": f"{spec.event_type} v{spec.version}",
        "summary": spec.summary,
        "contentType": "application/json",
        "payload": payload,
        "examples": examples,
        "bindings": {"redis": {"bindingVersion": "0.1.0"}},
    }
    if spec.source is not None:
        message["headers"] = _headers_schema(spec)
    else:
        message["contentType"] = "text/plain"
        message["description"] = (
            "Not JSON: the stream entry's fields, each a string (the payload is the field map)."
        )
    return message


def _ref(kind: str, key: str) -> dict[str, str]:
    return {"$ref": f"#/{kind}/{key}"}


def _channel_messages(*keys: str) -> dict[str, Any]:
    return {key: _ref("components/messages", key) for key in keys}


def asyncapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of orderflow's events (names from ``settings``)."""
    settings = settings or Settings()
    schemas: dict[str, Any] = {}
    messages = {spec.key: _message(spec, schemas) for spec in MESSAGES}
    orders = settings.stream
    order_messages = ("orderCreatedV1", "orderCreatedV2")
    redis_binding = {"redis": {"bindingVersion": "0.1.0"}}
    channels: dict[str, Any] = {
        "orders": {
            "address": orders,
            "title": "Orders stream",
            "description": (
                f"Redis stream `{orders}` (single server): one entry per event, CloudEvents "
                "attributes as fields, the payload in `data`. Consumer group "
                f"`{settings.group}`."
            ),
            "messages": _channel_messages(*order_messages),
            "bindings": redis_binding,
        },
        "ordersPartition": {
            # The key itself is the parameter: AsyncAPI has no way to escape the hash
            # tag's literal braces in an address.
            "address": "{partition}",
            "title": "Orders stream partitions (Redis Cluster)",
            "description": (
                f"On a cluster the stream is split into `{{{orders}:0}}` … "
                f"`{{{orders}:N-1}}`; an order's events go to partition crc32(id) % N."
            ),
            "parameters": {
                "partition": {
                    "description": f"A partition's key, `{{{orders}:N}}` for N from 0 to the "
                    "partition count - 1 (recorded in Redis, see `orderflow streams info`).",
                    "examples": [f"{{{orders}:0}}", f"{{{orders}:1}}"],
                }
            },
            "messages": _channel_messages(*order_messages),
            "bindings": redis_binding,
        },
        "ordersDeadLetters": {
            "address": f"{orders}:dlq",
            "title": "Dead letters",
            "description": (
                f"Entries of `{orders}` given up on (`{{{orders}:i}}:dlq` per partition on a "
                "cluster): the original fields plus dlq_* fields."
            ),
            "messages": _channel_messages("deadLetter"),
            "bindings": redis_binding,
        },
        "emailEvents": {
            "address": settings.email_events_stream,
            "title": "Email outcomes",
            "description": "Redis stream of the Email Service's answers, with the order id.",
            "messages": _channel_messages("emailSent", "emailFailed"),
            "bindings": redis_binding,
        },
        "ordersPubSub": {
            "address": settings.channel,
            "title": "Orders Pub/Sub channel (lab mode)",
            "description": (
                "Redis Pub/Sub channel, `ORDERFLOW_TRANSPORT=pubsub`: each message is the bare "
                "JSON of a version 1 order, no headers, as the lab's publisher sends it."
            ),
            "messages": _channel_messages("orderCreatedV1"),
            "bindings": redis_binding,
        },
    }

    def operation(
        action: str, channel: str, keys: tuple[str, ...], service: str, summary: str
    ) -> dict[str, Any]:
        return {
            "action": action,
            "channel": _ref("channels", channel),
            "messages": [_ref(f"channels/{channel}/messages", key) for key in keys],
            "summary": summary,
            "tags": [{"name": service}],
            "bindings": redis_binding,
        }

    operations = {
        "orderServicePublishesOrders": operation(
            "send",
            "orders",
            order_messages,
            "order-service",
            "The Order Service's outbox relay XADDs each new order (version per "
            "ORDERFLOW_ORDER_EVENT_VERSION, default 2).",
        ),
        "orderServicePublishesPartitions": operation(
            "send", "ordersPartition", order_messages, "order-service", "Same, on a cluster."
        ),
        "orderServicePublishesPubSub": operation(
            "send",
            "ordersPubSub",
            ("orderCreatedV1",),
            "order-service",
            "In Pub/Sub mode the relay also PUBLISHes the flat order.",
        ),
        "emailServiceConsumesOrders": operation(
            "receive",
            "orders",
            order_messages,
            "email-service",
            "The Email Service reads every version it knows (v1 upcast to v2) and "
            "dead-letters at once an entry of a version it does not know.",
        ),
        "emailServiceConsumesPartitions": operation(
            "receive", "ordersPartition", order_messages, "email-service", "Same, on a cluster."
        ),
        "emailServiceSubscribesPubSub": operation(
            "receive",
            "ordersPubSub",
            ("orderCreatedV1",),
            "email-service",
            "`orderflow email pubsub`: the lab's subscriber, at most once.",
        ),
        "emailServiceDeadLetters": operation(
            "send",
            "ordersDeadLetters",
            ("deadLetter",),
            "email-service",
            "An entry that cannot be handled (invalid, unknown version, out of retries).",
        ),
        "emailServicePublishesOutcomes": operation(
            "send",
            "emailEvents",
            ("emailSent", "emailFailed"),
            "email-service",
            "After each confirmation: sent, or failed with the reason.",
        ),
        "orderServiceConsumesOutcomes": operation(
            "receive",
            "emailEvents",
            ("emailSent", "emailFailed"),
            "order-service",
            f"Group `{settings.orders_group}` records each order's email status.",
        ),
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:orderflow:events",
        "info": {
            "title": "orderflow events",
            "version": _package_version(),
            "description": (
                "Orders and confirmation emails on Redis Streams. Payload versions are "
                "named by the `ce_dataschema` field (urn:orderflow:schema:<type>:<N>; "
                "absent: 1). Generated from orderflow's own models (`orderflow asyncapi`)."
            ),
            "tags": [{"name": "order-service"}, {"name": "email-service"}],
        },
        "servers": {
            "redis": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": "The Redis server (or a cluster node) of ORDERFLOW_REDIS_URL.",
                "bindings": redis_binding,
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


class _PlainDumper(yaml.SafeDumper):
    """A SafeDumper writing a shared object out again, never as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        """Always: readers of the document need not know YAML's aliases."""
        return True


def to_yaml(document: dict[str, Any]) -> str:
    """``document`` as YAML (block style, keys in the document's order)."""
    return yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True, width=100)
