"""Redis restarted empty mid-run: reconciliation publishes again, no accepted order unmailed.

When Redis loses everything it loses the email ledger too, so exactly-once cannot hold
for an order that was emailed while its confirmation had not reached the Order Service:
that order is published again and emailed a second time. What is promised, and asserted
here: every accepted order is emailed; an order confirmed before the loss is never
emailed again; a duplicate exists only for an order first emailed before the loss.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa

from .conftest import SCENARIO_TIMEOUT, Record, Stack, size, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]


def _confirmed(stack: Stack) -> set[int]:
    engine = sa.create_engine(f"sqlite:///{stack.db_path}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id FROM orders WHERE email_status = 'sent'"))
            return {int(row[0]) for row in rows}
    finally:
        engine.dispose()


async def test_redis_restarted_empty_every_order_still_emailed(
    make_stack: Callable[..., Awaitable[Stack]], reliability: Record
) -> None:
    half = size(300, 5000)
    reliability.scenario = "Redis restarted empty"
    reliability.must_hold = (
        "every accepted order emailed (reconciliation republishes); orders confirmed before "
        "the loss never emailed again; duplicates only for orders emailed but unconfirmed "
        "when the ledger was lost"
    )
    stack = await make_stack(persistent=False)
    await stack.start_api(reconcile_after_s="2")
    workers = [stack.start_worker(), stack.start_worker()]

    rate = size(150, 300)
    submitting = asyncio.create_task(stack.submit(list(range(1, half + 1)), rate=rate))
    # Mid-stream: some orders emailed and confirmed, some published and unread, some in
    # flight. The workers die with Redis, so what was unread is gone with it.
    await wait_until(lambda: len(stack.handler.by_order) >= half // 3, timeout=60)
    for worker in workers:
        worker.kill()
    # A backlog of published, unread orders to lose (the stack keeps up with this rate,
    # so without one only the few orders in flight would need publishing again).
    backlog = size(50, 300)

    async def lagging() -> bool:
        _, lag = await stack.group_state()
        return lag >= backlog

    await wait_until(lagging, timeout=60)
    await stack.redis_client.set("chaos:before-the-loss", 1)
    stack.redis.kill()
    wiped_at = time.monotonic()
    # Not a synchronisation the result depends on: a confirmation in flight that lands
    # after this read only leaves its order out of confirmed_before, which loosens the
    # check below (that order may be emailed again) and can never fail it. The pause
    # lets such confirmations land first, so that the check covers as many as it can.
    await asyncio.sleep(0.5)
    confirmed_before = await asyncio.to_thread(_confirmed, stack)
    await asyncio.to_thread(stack.redis.start)  # no AOF: empty
    restarted_at = time.monotonic()
    await stack.forget_client()
    # Restarted empty (the relay may already be publishing into it again).
    assert not await stack.redis_client.exists("chaos:before-the-loss")
    for worker in workers:
        stack.restart_worker(worker)
    first = await submitting

    second = await stack.submit(list(range(half + 1, 2 * half + 1)), rate=rate)
    accepted = first + second
    await stack.settle(accepted, timeout=size(90, 300))
    result = await stack.account(accepted)

    first_seen: dict[int, float] = {}
    for mail in stack.handler.mails:
        if mail.order_id is not None:
            first_seen.setdefault(mail.order_id, mail.at)
    emailed_before_loss = {i for i, at in first_seen.items() if at <= restarted_at}
    allowed = emailed_before_loss - confirmed_before
    republished = await stack.metric("orderflow_orders_republished_total")
    reliability.figures = {
        "orders": len(accepted),
        "emailed before the loss": len({i for i, at in first_seen.items() if at <= wiped_at}),
        "confirmed before the loss": len(confirmed_before),
        "republished": int(republished),
        "duplicates": result.duplicate_emails,
        "lost": len(result.lost),
        "dead letters": result.dead_letters,
    }
    reliability.notes = (
        "exactly-once cannot survive the loss of the ledger: "
        f"{result.duplicate_emails} order(s) emailed twice, all emailed before the loss "
        "and not yet confirmed; none lost"
    )
    assert result.lost == []
    assert result.unexpected == []
    assert not set(result.duplicates) & confirmed_before
    assert set(result.duplicates) <= allowed
    assert republished >= backlog
    assert result.dead_letters == 0
    assert result.pending == 0
    stack.assert_no_tracebacks()
