"""Each delivery's outcome, recorded per order for the console's journey page."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from orderflow.email.journey import (
    DEAD_LETTERED,
    RETRIED,
    SENT,
    JourneyRecorder,
    journey_key,
    read_journey,
)
from orderflow.email.ledger import SENT_TTL_S, ledger_key

from .conftest import ServiceFactory, SmtpFixture, publish_event, run_burst

ORDER = {"id": 101, "email": "alice@example.com", "total": "5.00", "currency": "EUR", "items": []}


async def test_a_retried_then_sent_order_records_both_deliveries(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    smtp.handler.data_replies.append("451 4.3.0 try again later")
    entry_id = await publish_event(aredis, ORDER)
    service = await make_service()
    await run_burst(service)

    steps = await read_journey(aredis, 101)
    assert [(s.outcome, s.deliveries) for s in steps] == [(RETRIED, 1), (SENT, 2)]
    assert {s.entry_id for s in steps} == {entry_id}
    assert {s.consumer for s in steps} == {service.consumer}
    assert "451" in (steps[0].reason or "")
    assert steps[1].message_id == (await aredis.hget(ledger_key(101), "message_id")).decode()
    # Kept as long as the ledger keeps the order's record.
    assert (await aredis.ttl(journey_key(101))) > SENT_TTL_S - 60


async def test_a_rejected_order_records_its_dead_lettering(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    smtp.handler.rcpt_reply = "550 5.1.1 no such user"
    await publish_event(aredis, ORDER)
    await run_burst(await make_service())

    (step,) = await read_journey(aredis, 101)
    assert step.outcome == DEAD_LETTERED
    assert "550" in (step.reason or "")


async def test_steps_are_batched_capped_and_oldest_first(aredis: aioredis.Redis) -> None:
    recorder = JourneyRecorder(aredis, keep=3, flush_after_s=0.05)
    for n in range(1, 6):
        recorder.note(
            7, consumer="w", stream="orders", entry_id="1-0", deliveries=n, outcome=RETRIED
        )
    recorder.note(8, consumer="w", stream="orders", entry_id="2-0", deliveries=1, outcome=SENT)
    # Buffered: nothing written until the batch goes out, in one pipeline.
    assert await aredis.exists(journey_key(7)) == 0
    await recorder.close()

    assert [s.deliveries for s in await read_journey(aredis, 7)] == [3, 4, 5]
    assert [s.outcome for s in await read_journey(aredis, 8)] == [SENT]


async def test_a_redis_error_is_logged_not_raised(aredis: aioredis.Redis) -> None:
    await aredis.set(journey_key(9), "not a list")
    recorder = JourneyRecorder(aredis, flush_after_s=0.01)
    recorder.note(9, consumer="w", stream="orders", entry_id="1-0", deliveries=1, outcome=SENT)
    recorder.note(10, consumer="w", stream="orders", entry_id="1-1", deliveries=1, outcome=SENT)
    await asyncio.sleep(0)
    await recorder.close()

    assert await aredis.get(journey_key(9)) == b"not a list"
