"""A send whose lease ran out before its SMTP transaction does not happen.

Found by the SIGSTOP scenario: a worker frozen between claiming an order and opening
its SMTP connection woke after another worker had sent the order, connected, and sent
it again. The Email Service now checks its lease once connected, before MAIL FROM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from orderflow.config import Settings
from orderflow.email import EmailService, SmtpSender, ledger_key
from orderflow.email.order import OrderEvent, parse_order
from orderflow.email.render import OutgoingEmail, Renderer
from orderflow.embedded.smtp_server import SmtpServer

from .conftest import CountingHandler, wait_until
from .faultproxy import FaultProxy


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    """A counting SMTP server."""
    server = SmtpServer(CountingHandler(), port=0)
    await server.start()
    yield server
    await server.stop()


def _email(order_id: int) -> OutgoingEmail:
    order = parse_order({"id": order_id, "email": "a@example.com", "total": 1})
    return Renderer("orderflow <orders@orderflow.localhost>").render(order)


async def test_a_failing_guard_aborts_the_send_before_any_transaction(smtp: SmtpServer) -> None:
    sender = SmtpSender(smtp.url)

    async def refuse() -> None:
        raise LookupError("not mine any more")

    try:
        with pytest.raises(LookupError):
            await sender.send(_email(1), before_transaction=refuse)
        await sender.send(_email(2))  # the connection is still good for the next one
    finally:
        await sender.close()
    handler: CountingHandler = smtp.handler
    assert dict(handler.by_order) == {2: 1}


@pytest.mark.parametrize("stolen", [False, True], ids=["still-held", "stolen"])
async def test_a_slow_connect_checks_the_lease_before_sending(
    aredis: aioredis.Redis, redis_url: str, smtp: SmtpServer, tmp_path: Path, stolen: bool
) -> None:
    # The SMTP greeting takes longer than the lease: meanwhile another worker takes
    # the order and sends it (or nobody does, and the slow sender goes on).
    proxy = FaultProxy("127.0.0.1", smtp.port)
    await proxy.start()
    proxy.latency_s = 0.25
    settings = Settings(
        redis_url=SecretStr(redis_url),
        smtp_url=SecretStr(proxy.url("smtp")),
        data_dir=tmp_path,
        claim_idle_ms=300,
        max_deliveries=3,
    )
    sender = SmtpSender(proxy.url("smtp"))
    service = EmailService(
        settings, aredis, sender, worker_options={"block_ms": 100, "retry_base_ms": 50}
    )
    await aredis.xadd("orders", {"data": b'{"id":7,"email":"a@example.com","total":1}'})
    task = asyncio.create_task(service.run(burst=True))
    try:
        await wait_until(lambda: aredis.hget(ledger_key(7), "state"), timeout=10, interval=0.01)
        if stolen:
            # What another worker does when it took the order over and sent it.
            await aredis.delete(ledger_key(7))
            await aredis.hset(ledger_key(7), mapping={"state": "sent", "message_id": "<x>"})
        await asyncio.wait_for(task, 20)
    finally:
        await sender.close()
        await proxy.stop()
    handler: CountingHandler = smtp.handler
    assert handler.by_order[7] == (0 if stolen else 1)
    assert await aredis.xpending("orders", "email-service") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_a_worker_frozen_between_claim_and_send_does_not_send(
    aredis: aioredis.Redis,
    redis_url: str,
    smtp: SmtpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by the SIGSTOP scenario once the check above existed: the check measured the
    # lease from the start of the send, so a freeze between the claim and the send
    # (here: inside render, which blocks the whole loop as SIGSTOP does) went unseen.
    settings = Settings(
        redis_url=SecretStr(redis_url),
        smtp_url=SecretStr(smtp.url),
        data_dir=tmp_path,
        claim_idle_ms=300,
        max_deliveries=3,
    )
    render = Renderer.render
    other_worker = redis.Redis.from_url(redis_url)
    frozen: list[int] = []

    def frozen_render(self: Renderer, order: OrderEvent) -> OutgoingEmail:
        # Runs inside the worker's handler: an error here would only be retried by the
        # worker, so what it did is checked after the run (``frozen``, the ledger).
        if not frozen:
            time.sleep(0.4)  # frozen past the lease; meanwhile another worker sent it:
            other_worker.delete(ledger_key(order.id))
            other_worker.hset(ledger_key(order.id), mapping={"state": "sent", "message_id": "<x>"})
        frozen.append(order.id)
        return render(self, order)

    monkeypatch.setattr(Renderer, "render", frozen_render)
    sender = SmtpSender(smtp.url)
    service = EmailService(
        settings, aredis, sender, worker_options={"block_ms": 100, "retry_base_ms": 50}
    )
    await aredis.xadd("orders", {"data": b'{"id":8,"email":"a@example.com","total":1}'})
    try:
        await asyncio.wait_for(service.run(burst=True), 20)
    finally:
        await sender.close()
        other_worker.close()
    handler: CountingHandler = smtp.handler
    assert handler.by_order[8] == 0
    # The freeze happened once, the other worker's record stands, nothing dead-lettered:
    # the order was acknowledged as sent, not given up on.
    assert frozen == [8]
    assert await aredis.hget(ledger_key(8), "message_id") == b"<x>"
    assert await aredis.xlen("orders:dlq") == 0
