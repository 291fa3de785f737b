"""A backlog bigger than the retention cap while the Email Service is down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from .conftest import SCENARIO_TIMEOUT, Record, Stack, size, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]

CAP = 200
#: The publisher trims every tenth of the cap (or every 1000 entries, if fewer).
TRIM_EVERY = CAP // 10


async def _over_cap_gauge(stack: Stack) -> float | None:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{stack.api_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith('orderflow_stream_over_cap{stream="orders"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_backlog_over_the_cap_keeps_every_entry_and_reports_the_pressure(
    make_stack: Callable[..., Awaitable[Stack]], reliability: Record
) -> None:
    backlog = size(400, 20_000)
    reliability.scenario = "Backlog over the retention cap"
    reliability.must_hold = (
        f"cap {CAP}, Email Service down: no unacknowledged entry trimmed, the producer "
        "warns and sets orderflow_stream_over_cap; after recovery every order emailed once "
        "and the stream trimmed back near the cap"
    )
    stack = await make_stack()
    await stack.start_api(stream_maxlen=str(CAP))
    workers = [stack.start_worker(), stack.start_worker()]

    # Both read the stream (so the group exists and SIGTERM finds their handlers).
    await wait_until(lambda: all("consuming" in w.output() for w in workers), timeout=30)
    assert [worker.stop() for worker in workers] == [0, 0]  # SIGTERM: a clean stop

    accepted = await stack.submit(list(range(1, backlog + 1)))
    await wait_until(lambda: asyncio.to_thread(lambda: stack.db_counts()[1] == 0), timeout=60)
    client = stack.redis_client
    length_down = int(await client.xlen("orders"))
    memory_down = int(await client.memory_usage("orders", samples=0) or 0)
    gauge_down = await _over_cap_gauge(stack)
    assert length_down == backlog, "an unacknowledged entry was trimmed"
    assert gauge_down == 1.0
    assert stack.api is not None
    assert "over its cap" in stack.api.output()

    for worker in workers:
        stack.restart_worker(worker)
    await stack.settle(accepted, timeout=size(60, 300))
    # A few more, so the publisher trims again now that the group keeps up.
    more = await stack.submit(list(range(backlog + 1, backlog + 5 * TRIM_EVERY + 1)))
    accepted += more
    await stack.settle(accepted, timeout=60)
    length_after = int(await client.xlen("orders"))
    memory_after = int(await client.memory_usage("orders", samples=0) or 0)
    gauge_after = await _over_cap_gauge(stack)
    result = await stack.account(accepted)
    reliability.figures = {
        "orders": result.accepted,
        "cap": CAP,
        "length while down": length_down,
        "MiB while down": round(memory_down / 2**20, 2),
        "length after": length_after,
        "MiB after": round(memory_after / 2**20, 2),
        "duplicates": result.duplicate_emails,
        "lost": len(result.lost),
    }
    # Approximate trimming removes whole stream nodes (100 entries by default).
    assert length_after <= CAP + TRIM_EVERY + 100
    assert gauge_after == 0.0
    assert result.duplicates == {}
    assert result.lost == []
    assert result.dead_letters == 0
    assert result.pending == 0
    stack.assert_no_tracebacks()
