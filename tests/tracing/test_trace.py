"""One trace per order across the real processes: the API, the relay, the email
workers (through a SIGKILL and a claim) and the status update, exported over OTLP/HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from orderflow.embedded.redis_server import free_port
from tests.email.conftest import ORDERFLOW, SmtpFixture, start_cli
from tests.support import order_body, wait_until
from tests.tracing.receiver import Receiver, Span

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, CONSUMER, PRODUCER = 2, 5, 4  # OTLP's SpanKind numbers


def _env(redis_url: str, smtp_url: str, data_dir: Path, receiver: Receiver) -> dict[str, str]:
    return {
        "ORDERFLOW_REDIS_URL": redis_url,
        "ORDERFLOW_SMTP_URL": smtp_url,
        "ORDERFLOW_DATA_DIR": str(data_dir),
        "ORDERFLOW_DATABASE_URL": f"sqlite:///{data_dir}/orders.db",
        "ORDERFLOW_CLAIM_IDLE_MS": "1000",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


def _named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


@pytest.mark.slow
async def test_one_order_is_one_trace_through_a_worker_crash_and_a_claim(
    redis_url: str,
    smtp: SmtpFixture,
    tmp_path: Path,
    receiver: Receiver,
    processes: list[asyncio.subprocess.Process],
) -> None:
    env = _env(redis_url, smtp.url, tmp_path, receiver)
    # The first DATA hangs: the first worker is killed mid-send, the second claims.
    smtp.handler.stall_next = 1
    doomed = await start_cli(
        processes, ["email", "worker", "--name", "doomed"], env, tmp_path / "doomed.log"
    )
    port = free_port()
    api_log = tmp_path / "api.log"
    with api_log.open("ab") as stderr:
        api = await asyncio.create_subprocess_exec(
            str(ORDERFLOW),
            *["orders", "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    processes.append(api)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

        async def healthy() -> bool:
            assert api.returncode is None, api_log.read_text()
            try:
                return (await client.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(healthy, timeout=30, what="the API")
        response = await client.post(
            "/orders",
            json=order_body(101),
            headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        assert response.status_code == 201, response.text
    order_id = response.json()["id"]

    await asyncio.wait_for(smtp.handler.stalled.wait(), 15)
    # The doomed delivery's finished child spans reach the receiver before the kill.
    await wait_until(
        lambda: _named(receiver.trace(TRACE_ID), "email.render"), what="the render span"
    )
    os.kill(doomed.pid, signal.SIGKILL)
    assert await asyncio.wait_for(doomed.wait(), 5) == -signal.SIGKILL
    await start_cli(
        processes, ["email", "worker", "--name", "survivor"], env, tmp_path / "survivor.log"
    )
    await wait_until(lambda: len(smtp.handler.received) == 1, timeout=20, what="the email")
    # Each process exports on its own schedule: wait for the last span of each.
    for name in ("process orders", "process email-events", "smtp send"):
        await wait_until(
            lambda name=name: _named(receiver.trace(TRACE_ID), name), timeout=20, what=name
        )

    spans = receiver.trace(TRACE_ID)
    ids = {s.span_id for s in spans}
    # The API's SERVER span continues the caller's traceparent.
    (server,) = [s for s in spans if s.kind == SERVER]
    assert server.parent_id == CALLER_SPAN
    assert server.service == "orderflow-orders"
    # The relay's XADD: a PRODUCER span under the request's.
    (send,) = _named(spans, "send orders")
    assert send.kind == PRODUCER
    assert send.parent_id == server.span_id
    assert send.attributes["messaging.system"] == "redis"
    # The survivor's delivery: the second, claimed after the crash, under the XADD.
    (delivery,) = _named(spans, "process orders")
    assert delivery.kind == CONSUMER
    assert delivery.service == "orderflow-email"
    assert delivery.parent_id == send.span_id
    assert delivery.attributes["messaging.destination.name"] == "orders"
    assert delivery.attributes["messaging.operation.type"] == "process"
    assert delivery.attributes["messaging.consumer.group.name"] == "email-service"
    assert delivery.attributes["messaging.redis.message.delivery_count"] == 2
    assert delivery.attributes["messaging.redis.consumer.name"] == "survivor"
    assert "claimed" in delivery.events
    assert delivery.attributes["orderflow.order.id"] == order_id
    assert server.attributes["orderflow.order.id"] == order_id
    # Both deliveries' child spans are in the trace: the killed one's (ledger claim,
    # render) under its delivery span, which died unexported with the process.
    claims = _named(spans, "email.ledger claim")
    renders = _named(spans, "email.render")
    assert len(claims) == 2
    assert len(renders) == 2
    (killed,) = {s.parent_id for s in claims + renders} - {delivery.span_id}
    assert killed not in ids
    # The stalled send never ended: only the survivor's is here.
    (smtp_send,) = _named(spans, "smtp send")
    assert smtp_send.parent_id == delivery.span_id
    # email.sent carries the context on; the Order Service's status update closes the loop.
    (status,) = _named(spans, "process email-events")
    assert status.service == "orderflow-orders"
    assert status.parent_id == delivery.span_id
    assert status.attributes["orderflow.order.id"] == order_id
    # Parent links unbroken: every span's parent is in the trace, but the caller's and
    # the killed delivery's.
    assert {s.parent_id for s in spans} - ids == {CALLER_SPAN, killed}
    # The order's email is marked sent.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        order = (await client.get(f"/orders/{order_id}")).json()
    assert order["email_status"] == "sent"


@pytest.mark.slow
async def test_a_plain_xadd_starts_a_trace_at_the_consumer(
    redis_url: str,
    smtp: SmtpFixture,
    tmp_path: Path,
    receiver: Receiver,
    processes: list[asyncio.subprocess.Process],
) -> None:
    import redis.asyncio as aioredis

    env = _env(redis_url, smtp.url, tmp_path, receiver)
    await start_cli(processes, ["email", "worker", "--name", "w1"], env, tmp_path / "w.log")
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd("orders", {"data": b'{"id":7,"email":"a@example.com","total":1}'})
    finally:
        await client.aclose()
    spans = await wait_until(
        lambda: [s for s in receiver.spans if s.name == "process orders"], what="the delivery"
    )
    (delivery,) = spans
    assert delivery.parent_id == ""  # a root span: a new trace
    await wait_until(lambda: len(receiver.trace(delivery.trace_id)) >= 4, what="its children")
    names = {s.name for s in receiver.trace(delivery.trace_id)}
    assert {"email.ledger claim", "email.render", "smtp send"} <= names
