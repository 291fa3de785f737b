"""The contract test across producer and document: every event orderflow publishes in
a real flow (Order API, relay, Email Service, real Redis and SMTP) validates against
the AsyncAPI document's schema for its type and version, headers and payload."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from orderflow.contracts import asyncapi_document
from orderflow.contracts.asyncapi import DEAD_LETTER, message_spec
from orderflow.domain import DATASCHEMA_FIELD, ORDER_CREATED_EVENT, schema_version
from orderflow.email import EmailService, SmtpSender

#: Imported so pytest finds it here too.
from tests.email.conftest import (
    FAST_WORKER,
    SmtpFixture,
    publish_order,
    run_burst,
)
from tests.orders.conftest import make_settings, running_api

V2_BODY: dict[str, Any] = {
    "customer": {"email": "alice@example.com", "name": "Alice"},
    "currency": "EUR",
    "lines": [{"sku": "BK-1", "name": "Book", "quantity": 2, "unit_price": "12.50"}],
    "total": "25.00",
}


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # $refs point into the document's components: validate inside the whole document.
    root = {**schema, "components": document["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def contract_errors(
    document: dict[str, Any], fields: dict[str, str], *, dead_letter: bool = False
) -> list[str]:
    """What is wrong with a stream entry per the document (empty: it conforms)."""
    if dead_letter:
        spec = message_spec(DEAD_LETTER, 1)
        message = document["components"]["messages"][spec.key]
        payload: Any = fields
    else:
        event_type = fields.get("ce_type", ORDER_CREATED_EVENT)
        version = schema_version(fields.get(DATASCHEMA_FIELD), event_type)
        spec = message_spec(event_type, version)
        message = document["components"]["messages"][spec.key]
        payload = orjson.loads(fields["data"])
        headers = {k: v for k, v in fields.items() if k != "data"}
        found = _validator(document, message["headers"]).iter_errors(headers)
        problems = [f"{spec.key} headers: {e.message}" for e in found]
    found = _validator(document, message["payload"]).iter_errors(payload)
    return [f"{spec.key} {list(e.path)}: {e.message}" for e in found] + (
        [] if dead_letter else problems
    )


async def _entries(redis: aioredis.Redis, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in await redis.xrange(stream)
    ]


async def test_every_published_event_conforms_to_the_document(
    aredis: aioredis.Redis, redis_url: str, smtp: SmtpFixture, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path}/orders.db"
    pubsub = aredis.pubsub()
    await pubsub.subscribe("orders")

    # The Order Service in Pub/Sub mode (streams too) publishing version 2 ...
    v2 = make_settings(database, redis_url, tmp_path, transport="pubsub")
    async with running_api(v2) as api:
        assert (await api.post(V2_BODY)).status_code == 201
        assert (await api.post({"email": "bob@example.com", "total": "3.00"})).status_code == 201
        assert await api.runtime.relay.publish_pending() == 2
        await api.runtime.relay.close()  # SQLite: hand the relay lease on at once
    # ... then, rolled back for an old consumer, version 1.
    v1 = make_settings(database, redis_url, tmp_path, order_event_version=1)
    async with running_api(v1) as api:
        body = {"email": "carol@example.com", "total": "2.00", "items": [{"name": "pen"}]}
        assert (await api.post(body)).status_code == 201
        assert await api.runtime.relay.publish_pending() == 1
    # Other producers: an invalid order (email.failed and a dead letter) and a version
    # this consumer does not know (a dead letter).
    await publish_order(aredis, {"id": 77, "email": "not an address", "total": 1})
    await publish_order(aredis, {"id": 78}, ce_dataschema="urn:orderflow:schema:order.created:3")

    settings = v2.model_copy(update={"smtp_url": SecretStr(smtp.url), "max_deliveries": 2})
    sender = SmtpSender(smtp.url, pool_size=2)
    try:
        service = EmailService(settings, aredis, sender, worker_options=FAST_WORKER)
        await run_burst(service)
    finally:
        await sender.close()

    document = asyncapi_document(settings)
    published = [
        fields
        for fields in await _entries(aredis, "orders")
        if fields.get("ce_source") == "orderflow/orders"
    ]
    versions = sorted(fields.get(DATASCHEMA_FIELD, "v1") for fields in published)
    assert versions == ["urn:orderflow:schema:order.created:2"] * 2 + ["v1"]
    outcomes = await _entries(aredis, "email-events")
    assert sorted(fields["ce_type"] for fields in outcomes) == ["email.failed"] + ["email.sent"] * 3
    dead = await _entries(aredis, "orders:dlq")
    assert len(dead) == 2
    lab: list[dict[str, str]] = []
    deadline = time.monotonic() + 10
    while len(lab) < 2:
        assert time.monotonic() < deadline, f"the relay's Pub/Sub messages never came: {lab}"
        # None also for the (ignored) subscribe confirmation.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            lab.append({"data": message["data"].decode()})  # bare JSON: v1, no headers
    assert sorted(orjson.loads(m["data"])["email"] for m in lab) == [
        "alice@example.com",
        "bob@example.com",
    ]
    await pubsub.aclose()  # type: ignore[no-untyped-call]

    problems = [
        problem
        for fields in published + outcomes + lab
        for problem in contract_errors(document, fields)
    ] + [
        problem
        for fields in dead
        for problem in contract_errors(document, fields, dead_letter=True)
    ]
    assert problems == []


def test_the_check_sees_a_nonconforming_event() -> None:
    # Planted faults: the contract test above must be able to fail.
    document = asyncapi_document()
    v2_as_v1 = {"data": orjson.dumps(V2_BODY | {"id": 1}).decode(), "ce_type": "order.created"}
    assert any("'email' is a required property" in p for p in contract_errors(document, v2_as_v1))
    undeclared = {
        "data": orjson.dumps({"id": 1, "email": "a@example.com", "total": "1"}).decode(),
        "ce_dataschema": "urn:orderflow:schema:order.created:2",
    }
    assert contract_errors(document, undeclared)
    sent = {
        "data": orjson.dumps(
            {"order_id": "1", "email": "a@b.c", "message_id": "x", "at": "t"}
        ).decode(),
        "ce_type": "email.sent",
        "ce_source": "orderflow/email",
    }
    assert any("order_id" in p for p in contract_errors(document, sent))
    assert contract_errors(document, {"dlq_reason": "x"}, dead_letter=True)
    with pytest.raises(KeyError):
        contract_errors(
            document, {"data": "{}", DATASCHEMA_FIELD: "urn:orderflow:schema:order.created:3"}
        )
