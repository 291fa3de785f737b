"""Network faults between the workers and Redis, and between the workers and SMTP.

Both links go through a :class:`FaultProxy`: added latency, connections reset in the
middle of commands, then a peer that stops answering (bytes dropped, connection open).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from .conftest import SCENARIO_TIMEOUT, Record, Stack, size, wait_until
from .faultproxy import FaultProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]

SMTP_TIMEOUT_S = 3


async def _faults(
    redis_proxy: FaultProxy,
    smtp_proxy: FaultProxy,
    phase_s: float,
    silent_s: float,
    smtp_faults: list[tuple[float, float]],
) -> None:
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
    smtp_faults.append((started, time.monotonic()))
    # Silent for longer than the clients' timeouts (Redis 5 s, SMTP 3 s here).
    silent_from = time.monotonic()
    redis_proxy.blackhole = True
    await asyncio.sleep(silent_s)
    redis_proxy.heal()
    # A send accepted by SMTP while Redis was silent is recorded late, after its lease
    # ran out (the client's 5 s timeout, then retries): the same "accepted, not yet
    # recorded" window, stretched by the fault.
    smtp_faults.append((silent_from, time.monotonic() + 5 + 2))
    await asyncio.sleep(phase_s / 2)
    started = time.monotonic()
    smtp_proxy.blackhole = True
    await asyncio.sleep(silent_s)
    smtp_proxy.heal()
    smtp_faults.append((started, time.monotonic()))


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
    redis_proxy = FaultProxy("127.0.0.1", stack.redis.port)
    smtp_proxy = FaultProxy("127.0.0.1", stack.smtp.port)
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
        smtp_faults: list[tuple[float, float]] = []
        total_s = phase_s * 4 + silent_s * 2
        faults = asyncio.create_task(
            _faults(redis_proxy, smtp_proxy, phase_s, silent_s, smtp_faults)
        )
        count = int(total_s * rate)
        accepted = await stack.submit(list(range(1, count + 1)), rate=rate)
        await faults
        await stack.settle(accepted, timeout=size(90, 300))
        result = await stack.account(accepted)
    finally:
        await redis_proxy.stop()
        await smtp_proxy.stop()

    first_seen: dict[int, float] = {}
    for mail in stack.handler.mails:
        if mail.order_id is not None:
            first_seen.setdefault(mail.order_id, mail.at)
    unexplained = [
        order_id
        for order_id in result.duplicates
        if not any(
            start - SMTP_TIMEOUT_S <= first_seen[order_id] <= end + 1 for start, end in smtp_faults
        )
    ]
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
            f"{result.duplicate_emails} duplicate(s) while a link was reset or silent: SMTP "
            "accepted and the worker never heard its 250, or could not record it in Redis "
            "before its lease ran out (same Message-ID)"
        )
    assert result.lost == []
    assert result.unexpected == []
    assert unexplained == [], f"duplicates outside the SMTP faults: {unexplained}"
    assert result.dead_letters == 0
    assert result.pending == 0
    assert all(worker.alive for worker in stack.workers)
