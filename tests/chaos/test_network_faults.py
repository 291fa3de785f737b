"""Network faults between the workers and Redis, and between the workers and SMTP.

Both links go through a :class:`FaultProxy`: added latency, connections reset in the
middle of commands, then a peer that stops answering (bytes dropped, connection open).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from .accounting import FaultLog
from .conftest import (
    SCENARIO_TIMEOUT,
    Record,
    Stack,
    duplicates_file,
    size,
    wait_until,
    write_duplicate_report,
)
from .faultproxy import FaultProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]

SMTP_TIMEOUT_S = 3


async def _faults(
    redis_proxy: FaultProxy,
    smtp_proxy: FaultProxy,
    phase_s: float,
    silent_s: float,
    faults: FaultLog,
) -> None:
    """Latency, then resets, then Redis silent, then SMTP silent. The proxies record
    what they cut or dropped; the Redis link's silence is recorded as an outage."""
    both = (redis_proxy, smtp_proxy)
    await asyncio.sleep(phase_s / 2)
    for proxy in both:
        proxy.latency_s = 0.05
    await asyncio.sleep(phase_s)
    for proxy in both:
        proxy.heal()
    # Resets in the middle of whatever is in flight, several times a second.
    started = time.monotonic()
    while time.monotonic() - started < phase_s:
        for proxy in both:
            proxy.reset_all()
        await asyncio.sleep(0.3)
    # Silent for longer than the clients' timeouts (Redis 5 s, SMTP 3 s here).
    silent_from = time.monotonic()
    redis_proxy.blackhole = True
    await asyncio.sleep(silent_s)
    redis_proxy.heal()
    faults.outage("Redis link silent", silent_from, time.monotonic())
    await asyncio.sleep(phase_s / 2)
    smtp_proxy.blackhole = True
    await asyncio.sleep(silent_s)
    smtp_proxy.heal()


async def test_latency_resets_and_silent_peers_lose_nothing(
    make_stack: Callable[..., Awaitable[Stack]], reliability: Record
) -> None:
    phase_s = size(2, 15)
    silent_s = size(6, 20)
    rate = size(40, 100)
    reliability.scenario = "Network faults (proxy)"
    reliability.must_hold = (
        "50 ms latency, connections reset mid-command, Redis and then SMTP silent: every "
        "order emailed; duplicates only where SMTP accepted and its reply or record was cut"
    )
    stack = await make_stack()
    await stack.start_api()
    redis_proxy = FaultProxy("127.0.0.1", stack.redis.port, faults=stack.faults, name="Redis link")
    smtp_proxy = FaultProxy(
        "127.0.0.1", stack.smtp.port, faults=stack.faults, name="SMTP link", smtp=True
    )
    await redis_proxy.start()
    await smtp_proxy.start()
    try:
        env = stack.env(
            redis_url=redis_proxy.url("redis", "/0"),
            smtp_url=smtp_proxy.url("smtp", f"?timeout={SMTP_TIMEOUT_S}"),
        )
        workers = [stack.start_worker(env) for _ in range(2)]
        # Faults start once both read (a worker that cannot reach Redis at start exits).
        await wait_until(lambda: all("consuming" in w.output() for w in workers), timeout=30)
        total_s = phase_s * 4 + silent_s * 2
        faults = asyncio.create_task(
            _faults(redis_proxy, smtp_proxy, phase_s, silent_s, stack.faults)
        )
        count = int(total_s * rate)
        accepted = await stack.submit(list(range(1, count + 1)), rate=rate)
        await faults
        await stack.settle(accepted, timeout=size(90, 300))
        result = await stack.account(accepted)
    finally:
        await redis_proxy.stop()
        await smtp_proxy.stop()

    # Each duplicate must be explained by a fault the proxies really injected into it.
    write_duplicate_report(stack, result, duplicates_file("network"))
    reliability.figures = {
        "orders": result.accepted,
        "latency ms": 50,
        "connections reset": redis_proxy.resets + smtp_proxy.resets,
        "silent s": silent_s,
        "duplicates": result.duplicate_emails,
        "lost": len(result.lost),
        "dead letters": result.dead_letters,
    }
    if result.duplicates:
        reliability.notes = (
            f"{result.duplicate_emails} duplicate(s), each where a link fault hit it: "
            + "; ".join(f"order {i}: {why}" for i, why in sorted(result.excused.items()))
            + " (SMTP accepted and the worker never heard its 250, or could not record it "
            "in Redis before its lease ran out; same Message-ID)"
        )
    assert result.lost == []
    assert result.unexpected == []
    assert result.unexplained == {}, f"duplicates no injected fault explains: {result.unexplained}"
    assert result.dead_letters == 0
    assert result.pending == 0
    assert all(worker.alive for worker in stack.workers)
