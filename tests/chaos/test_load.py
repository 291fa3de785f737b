"""The load generator, against a scripted HTTP transport: what it retries, what it refuses."""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest

from .load import OrderRefused, submit


def _transport(answers: dict[int, list[int | None]], seen: Counter[int]) -> httpx.MockTransport:
    """Answers each order's POSTs with the listed statuses in turn (None: connection
    refused), then 201."""

    def handle(request: httpx.Request) -> httpx.Response:
        order_id = json.loads(request.content)["id"]
        seen[order_id] += 1
        queue = answers.get(order_id, [])
        status = queue.pop(0) if queue else 201
        if status is None:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(status, json={"detail": "x"})

    return httpx.MockTransport(handle)


async def test_5xx_and_connection_errors_are_retried_with_the_same_id() -> None:
    seen: Counter[int] = Counter()
    transport = _transport({2: [503, None, 500]}, seen)
    accepted = await submit("http://api.test", [1, 2, 3], transport=transport, retry_pause_s=0.001)
    assert sorted(accepted) == [1, 2, 3]
    assert seen == {1: 1, 2: 4, 3: 1}


async def test_a_4xx_is_a_refusal_not_retried() -> None:
    seen: Counter[int] = Counter()
    transport = _transport({2: [422]}, seen)
    with pytest.raises(OrderRefused, match="order 2: 422"):
        await submit("http://api.test", [2], transport=transport)
    assert seen[2] == 1


async def test_an_order_never_accepted_fails_after_give_up() -> None:
    transport = _transport({1: [503] * 1000}, Counter())
    with pytest.raises(AssertionError, match="order 1 never accepted"):
        await submit(
            "http://api.test", [1], transport=transport, give_up_s=0.05, retry_pause_s=0.001
        )


async def test_the_rate_is_a_ceiling() -> None:
    started = time.monotonic()
    accepted = await submit(
        "http://api.test", list(range(20)), rate=200, transport=_transport({}, Counter())
    )
    # 20 orders at 200/s: the last is issued 0.1 s after the start, not before.
    assert time.monotonic() - started >= 0.1
    assert sorted(accepted) == list(range(20))


@pytest.mark.parametrize(("option", "value"), [("concurrency", 0), ("rate", 0.0)])
async def test_bad_settings_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        await submit("http://api.test", [1], **{option: value})  # type: ignore[arg-type]
