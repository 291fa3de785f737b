"""A worker frozen (SIGSTOP) longer than the claim timeout, then thawed: no second email,
and it goes on handling orders."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.exceptions import ResponseError

from orderflow.email import ledger_key

from .conftest import SCENARIO_TIMEOUT, Record, Stack, wait_until
from .faultproxy import FaultProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]

CLAIM_IDLE_S = 2.0


async def test_worker_stopped_past_the_claim_timeout_sends_nothing_twice(
    make_stack: Callable[..., Awaitable[Stack]], reliability: Record
) -> None:
    reliability.scenario = "Worker SIGSTOPped past the claim timeout"
    reliability.must_hold = (
        "its entries are claimed and sent by another worker; once thawed it sends none "
        "of them again, and sends new orders alone once the other worker stops"
    )
    stack = await make_stack()
    await stack.start_api()
    # The frozen worker reaches SMTP through a proxy that refuses at first, so when it
    # is stopped it holds every entry, between retries, outside any SMTP transaction.
    proxy = FaultProxy("127.0.0.1", stack.smtp.port)
    await proxy.start()
    try:
        proxy.refuse = True
        frozen = stack.start_worker(stack.env(smtp_url=proxy.url("smtp")))
        count = 20
        accepted = await stack.submit(list(range(1, count + 1)))

        async def frozen_holds_all() -> bool:
            try:
                rows = await stack.redis_client.xpending_range(
                    "orders", "email-service", "-", "+", 100, consumername="worker-0"
                )
            except ResponseError:  # the group does not exist yet
                return False
            return len(rows) == count

        await wait_until(frozen_holds_all, timeout=30)
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        proxy.heal()
        rescuer = stack.start_worker()
        await stack.settle(accepted, timeout=30)
        # Frozen for three claim timeouts in all, then thawed: its retry timers fire at once.
        await asyncio.sleep(max(0.0, stopped_at + 3 * CLAIM_IDLE_S - time.monotonic()))
        frozen.signal(signal.SIGCONT)
        stopped_s = time.monotonic() - stopped_at
        await asyncio.sleep(2 * CLAIM_IDLE_S)

        # The thawed worker goes on working: with the rescuer stopped (cleanly), only it
        # can send the next orders; the ledger names the sender of each.
        assert rescuer.alive
        assert await asyncio.to_thread(rescuer.stop) == 0
        more = await stack.submit(list(range(count + 1, 2 * count + 1)))
        await stack.settle(accepted + more, timeout=30)
        senders: list[bytes] = [
            await stack.redis_client.hget(ledger_key(i), "token") or b"" for i in more
        ]
        result = await stack.account(accepted + more)
        reliability.figures = {
            "orders": result.accepted,
            "stopped s": round(stopped_s, 1),
            "claim timeout s": CLAIM_IDLE_S,
            "emails": len(stack.handler.mails),
            "sent by the thawed worker after": sum(
                1 for t in senders if t.startswith(b"worker-0:")
            ),
            "duplicates": result.duplicate_emails,
            "lost": len(result.lost),
        }
    finally:
        await proxy.stop()
    assert result.duplicates == {}
    assert result.lost == []
    assert result.dead_letters == 0
    assert result.pending == 0
    assert frozen.alive
    assert all(t.startswith(b"worker-0:") for t in senders), senders
    stack.assert_no_tracebacks()
