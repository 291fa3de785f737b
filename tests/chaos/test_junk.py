"""Junk on the orders stream and oversized payloads, through the real processes."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from orderflow.bus.message import MAX_ENTRY_BYTES
from orderflow.orders.validation import MAX_BODY_BYTES

from .conftest import SCENARIO_TIMEOUT, Record, Stack, chaos_rng, size, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]

#: Orders named by junk entries: far from the real ones, so no junk touches them.
JUNK_IDS = 1_000_000


def _junk(rng: random.Random, n: int) -> dict[Any, Any]:
    """One hostile stream entry; never a valid order, never another event type."""
    order_id = JUNK_IDS + n
    kind = n % 12
    noise = rng.randbytes(rng.randint(0, 64))
    if kind == 0:
        return {b"payload": noise or b"x"}
    if kind == 1:
        return {b"data": noise + b"\xff"}
    if kind == 2:
        return {b"data": rng.choice([b"[]", b"1", b'"s"', b"null", b"true"])}
    if kind == 3:
        return {b"data": json.dumps({"id": "x", "email": 5, "total": []}).encode()}
    if kind == 4:
        bad = {"id": order_id, "email": "a@example.com\r\nBcc: evil@evil.test", "total": 1}
        return {b"data": json.dumps(bad).encode()}
    if kind == 5:
        return {
            b"data": json.dumps({"id": order_id, "email": "a@example.com", "total": "NaN"}).encode()
        }
    if kind == 6:
        big = {"id": order_id, "email": "a@example.com", "total": 1, "pad": "x" * MAX_ENTRY_BYTES}
        return {b"data": json.dumps(big).encode()}
    if kind == 7:
        return {b"data": b"[" * 5000 + b"]" * 5000}
    if kind == 8:
        fields = {f"f{i}".encode(): b"v" for i in range(40)}
        return {**fields, b"data": b"{}"}
    if kind == 9:
        return {b"data": b"{}", b"ce_id": b"i" * 5000}
    if kind == 10:
        return {b"\xfe\xff": noise or b"x", b"data": b"{}"}
    return {b"data": json.dumps({"id": order_id, "email": "not an address", "total": 1}).encode()}


async def test_junk_entries_are_dead_lettered_and_workers_live_on(
    make_stack: Callable[..., Awaitable[Stack]], reliability: Record
) -> None:
    junk_count = size(120, 2000)
    reliability.scenario = "Junk and oversized entries"
    reliability.must_hold = (
        "random junk XADDed to orders: all dead-lettered, workers alive, real orders "
        "emailed once; a body over the limit refused by the API with 422"
    )
    stack = await make_stack()
    await stack.start_api()
    workers = [stack.start_worker(), stack.start_worker()]
    client = stack.redis_client
    rng = chaos_rng()

    # Oversized at the API: refused, naming the body, nothing stored.
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as http:
        oversized: dict[str, Any] = {
            "email": "a@example.com",
            "total": "1.00",
            "items": [{"name": "x" * 200, "quantity": 1}] * 400,
        }
        response = await http.post("/orders", json=oversized)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "body"
        assert str(MAX_BODY_BYTES) in response.json()["errors"][0]["message"]

    real = list(range(1, 41))
    accepted = await stack.submit(real[:20])
    for n in range(junk_count):
        await client.xadd("orders", _junk(rng, n))
    accepted += await stack.submit(real[20:])

    async def all_dead_lettered() -> bool:
        return await stack.dead_letters() == junk_count

    await wait_until(all_dead_lettered, timeout=60)
    await stack.settle(accepted, timeout=60)
    result = await stack.account(accepted)
    reliability.figures = {
        "junk entries": junk_count,
        "dead-lettered": result.dead_letters,
        "real orders": result.accepted,
        "duplicates": result.duplicate_emails,
        "lost": len(result.lost),
    }
    assert result.dead_letters == junk_count
    assert result.lost == []
    assert result.duplicates == {}
    assert result.unexpected == []
    assert [mail for mail in stack.handler.mails if mail.order_id is None] == []
    assert all(len(mail.rcpt_tos) == 1 for mail in stack.handler.mails)
    assert result.pending == 0
    assert all(worker.alive for worker in workers)
    stack.assert_no_tracebacks()
