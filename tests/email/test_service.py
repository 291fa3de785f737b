"""The Email Service end to end: real Redis, real aiosmtpd, the bus's worker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orderflow.bus import Delivery, Message
from orderflow.config import Settings
from orderflow.email import (
    Claim,
    ClaimState,
    EmailLedger,
    EmailSent,
    EmailService,
    ledger_key,
    parse_order,
)
from tests.support import wait_until

from .conftest import (
    ServiceFactory,
    SmtpFixture,
    dead_letters,
    email_events,
    pending_count,
    publish_event,
    publish_order,
    run_burst,
)

ALICE: dict[str, Any] = {"id": 101, "email": "alice@example.com", "total": 100}


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_confirmation_content_and_email_sent_event(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    order = {
        "id": 101,
        "email": "alice@example.com",
        "total": "100.00",
        "currency": "USD",
        "items": [{"name": "Lab notebook", "quantity": 2, "price": "50.00"}],
    }
    await publish_event(aredis, order)
    stats = await run_burst(await make_service())

    assert stats.handled == 1
    (received,) = smtp.handler.received
    assert received.rcpt_tos == ["alice@example.com"]
    assert received.mail_from == "orders@orderflow.localhost"
    msg = received.message
    assert msg["Subject"] == "Order #101 confirmed"
    assert msg["To"] == "alice@example.com"
    assert msg["Message-ID"] == "<order-101@orderflow.localhost>"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None
    assert html is not None
    for body in (text.get_content(), html.get_content()):
        assert "#101" in body
        assert "Lab notebook" in body
        assert "100.00 USD" in body

    (event,) = await email_events(aredis)
    assert event.type == "email.sent"
    assert event.headers["ce_source"] == "orderflow/email"
    assert event.data["order_id"] == 101
    assert event.data["email"] == "alice@example.com"
    assert event.data["message_id"] == "<order-101@orderflow.localhost>"
    assert event.data["at"]
    assert await aredis.hget(ledger_key(101), "state") == b"sent"
    assert 0 < await aredis.ttl(ledger_key(101)) <= 30 * 24 * 3600
    assert await pending_count(aredis) == 0


async def test_plain_xadd_from_any_producer_is_handled(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    # What `XADD orders * data '{"id":101,...}'` in redis-cli writes: one field.
    await aredis.xadd("orders", {"data": b'{"id":101,"email":"alice@example.com","total":100}'})
    # Events of other types are not the Email Service's: acknowledged and ignored.
    await publish_order(aredis, {"id": 5}, ce_type="order.cancelled")
    stats = await run_burst(await make_service())

    assert stats.handled == 2
    assert [r.rcpt_tos for r in smtp.handler.received] == [["alice@example.com"]]
    text = smtp.handler.received[0].message.get_body(("plain",))
    assert text is not None
    assert "100 USD" in text.get_content()
    assert await dead_letters(aredis) == []
    assert await pending_count(aredis) == 0


async def test_malformed_entries_are_dead_lettered_with_email_failed(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    await aredis.xadd("orders", {"data": b"{not json"})
    await aredis.xadd("orders", {"other": b"no data field"})
    await publish_order(aredis, {"id": 201, "total": 10})  # no email
    await publish_order(aredis, {"id": 202, "email": "nope", "total": 10})
    await publish_order(aredis, {"id": 203, "email": "c@example.com", "total": -1})
    await publish_order(aredis, {"email": "d@example.com", "total": 1})  # no id
    stats = await run_burst(await make_service())

    assert smtp.handler.received == []
    assert smtp.handler.data_attempts == 0
    dlq = await dead_letters(aredis)
    assert len(dlq) == 6
    assert stats.dead_lettered == 6
    reasons = " | ".join(d["dlq_reason"] for d in dlq)
    assert "not valid UTF-8 JSON" in reasons
    assert "no 'data' field" in reasons
    assert "email" in reasons
    assert "total" in reasons
    failed = {e.data["order_id"]: e for e in await email_events(aredis)}
    # An email.failed for every order that could be identified.
    assert sorted(failed) == [201, 202, 203]
    assert all(e.type == "email.failed" for e in failed.values())
    assert "email" in failed[202].data["reason"]
    assert await pending_count(aredis) == 0


async def test_duplicate_entries_and_redelivery_send_one_email(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    # The same order: a relay duplicate, a republish with a new event id, a plain XADD.
    await publish_event(aredis, ALICE)
    await publish_event(aredis, ALICE)
    await publish_order(aredis, ALICE)
    duplicates_before = _sample("orderflow_emails_duplicates_skipped_total")
    await run_burst(await make_service())
    assert len(smtp.handler.received) == 1
    assert _sample("orderflow_emails_duplicates_skipped_total") - duplicates_before == 2

    # Redelivery of everything (as after a crash before the acks): no new email.
    await aredis.xgroup_setid("orders", "email-service", "0")
    stats = await run_burst(await make_service())
    assert stats.handled == 3
    assert len(smtp.handler.received) == 1
    events = await email_events(aredis)
    assert {e.type for e in events} == {"email.sent"}
    assert {e.data["message_id"] for e in events} == {"<order-101@orderflow.localhost>"}
    assert await pending_count(aredis) == 0


async def test_two_workers_racing_send_each_order_once(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    # Every order twice, a batch apart, and a slow server: each worker reads one copy
    # of every order, and both try to send it at the same time.
    smtp.handler.delay_s = 0.05
    orders = [{"id": n, "email": f"user{n}@example.com", "total": n} for n in range(1, 9)]
    for order in orders:
        await publish_event(aredis, order)
    for order in orders:
        await publish_order(aredis, order)
    first = await make_service(concurrency=8, batch_size=8)
    second = await make_service(concurrency=8, batch_size=8)
    busy = [_count_busy_claims(first), _count_busy_claims(second)]
    stats = await asyncio.gather(run_burst(first), run_burst(second))

    assert sum(s.handled for s in stats) == 16
    assert busy[0][0] + busy[1][0] > 0, "an order was claimed while it was being sent"
    recipients = sorted(r.rcpt_tos[0] for r in smtp.handler.received)
    assert recipients == sorted(str(o["email"]) for o in orders)
    assert await dead_letters(aredis) == []
    assert await pending_count(aredis) == 0


def _count_busy_claims(service: EmailService) -> list[int]:
    """Count the ledger claims of ``service`` that found the order being sent."""
    seen = [0]
    claim = service.ledger.claim

    async def counting(order_id: int, token: str) -> Claim:
        result = await claim(order_id, token)
        seen[0] += result.state is ClaimState.BUSY
        return result

    service.ledger.claim = counting  # type: ignore[method-assign]
    return seen


async def test_ledger_claim_is_atomic(aredis: aioredis.Redis) -> None:
    ledger = EmailLedger(aredis, lease_ms=200)
    claims = await asyncio.gather(*(ledger.claim(9, f"t{n}") for n in range(50)))
    winners = [n for n, c in enumerate(claims) if c.state is ClaimState.CLAIMED]
    assert len(winners) == 1
    others = [c for n, c in enumerate(claims) if n != winners[0]]
    assert all(c.state is ClaimState.BUSY and c.lease_left_ms > 0 for c in others)
    winner = f"t{winners[0]}"
    # Only the holder renews or releases.
    assert not await ledger.renew(9, "other")
    assert not await ledger.release(9, "other")
    assert await ledger.renew(9, winner)
    # A lease that runs out (the sender died) frees the order.
    await wait_until(lambda: _claimed(ledger, 9, "late"), timeout=2)
    # The dead sender's late mark is still recorded, but reported as a lost lease,
    # and so is its retry.
    assert not await ledger.mark_sent(9, winner, "<m>", "now")
    assert not await ledger.mark_sent(9, winner, "<m>", "now")
    sent = await ledger.claim(9, "again")
    assert sent.state is ClaimState.SENT
    assert sent.message_id == "<m>"
    assert await ledger.mark_sent(10, "x", "<n>", "now") is False


async def test_a_mark_retried_after_a_lost_reply_is_still_the_holders(
    aredis: aioredis.Redis,
) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    assert (await ledger.claim(11, "me")).state is ClaimState.CLAIMED
    assert await ledger.mark_sent(11, "me", "<m>", "now")
    # The reply was lost; the retry finds its own record: held, not "lease lost".
    assert await ledger.mark_sent(11, "me", "<m>", "now")
    assert not await ledger.mark_sent(11, "someone else", "<m>", "now")

    # The same for the one-script mark + email.sent: the retry appends nothing again.
    assert (await ledger.claim(12, "me")).state is ClaimState.CLAIMED
    first = await ledger.mark_sent_and_append(
        12, "me", "<m>", "now", stream="email-events", fields=["data", "{}"]
    )
    assert first[0] is True
    assert first[1] is not None
    again = await ledger.mark_sent_and_append(
        12, "me", "<m>", "now", stream="email-events", fields=["data", "{}"]
    )
    assert again == (True, None)
    assert await aredis.xlen("email-events") == 1


async def _claimed(ledger: EmailLedger, order_id: int, token: str) -> bool:
    return (await ledger.claim(order_id, token)).state is ClaimState.CLAIMED


async def test_transient_4xx_is_retried_after_backoff(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    smtp.handler.data_replies.extend(["451 4.3.0 try again later", "421 4.3.2 busy"])
    await publish_event(aredis, ALICE)
    started = time.monotonic()
    stats = await run_burst(await make_service(retry_base_ms=100))
    elapsed = time.monotonic() - started

    assert smtp.handler.data_attempts == 3
    assert len(smtp.handler.received) == 1
    assert stats.retried == 2
    # Backoff with jitter: at least half of 100 ms, then half of 200 ms.
    assert elapsed >= 0.15
    assert [e.type for e in await email_events(aredis)] == ["email.sent"]
    assert await dead_letters(aredis) == []


async def test_transient_failures_past_the_limit_publish_email_failed(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    smtp.handler.data_replies.extend(["451 4.3.0 later"] * 10)
    await publish_event(aredis, ALICE)
    await run_burst(await make_service())

    assert smtp.handler.data_attempts == 4  # max_deliveries in the test settings
    (dlq,) = await dead_letters(aredis)
    assert "451" in dlq["dlq_reason"]
    (event,) = await email_events(aredis)
    assert event.type == "email.failed"
    assert "gave up after 4 deliveries" in event.data["reason"]
    # Nothing held: a replay from the dead-letter stream can send it.
    assert not await aredis.exists(ledger_key(101))


@pytest.mark.parametrize(
    ("rcpt", "data", "mentions"),
    [
        (None, "554 5.6.0 message rejected", "554"),
        ("550 5.1.1 no such user", None, "550"),
    ],
)
async def test_permanent_5xx_is_not_retried(
    aredis: aioredis.Redis,
    smtp: SmtpFixture,
    make_service: ServiceFactory,
    rcpt: str | None,
    data: str | None,
    mentions: str,
) -> None:
    smtp.handler.rcpt_reply = rcpt
    if data:
        smtp.handler.data_replies.append(data)
    await publish_event(aredis, ALICE)
    stats = await run_burst(await make_service())

    assert stats.retried == 0
    assert smtp.handler.received == []
    assert smtp.handler.data_attempts == (1 if data else 0)
    (dlq,) = await dead_letters(aredis)
    assert mentions in dlq["dlq_reason"]
    assert dlq["dlq_deliveries"] == "1"
    (event,) = await email_events(aredis)
    assert event.type == "email.failed"
    assert event.data["order_id"] == 101
    assert mentions in event.data["reason"]
    assert not await aredis.exists(ledger_key(101))


async def test_utf8_address_needs_smtputf8(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    await publish_event(aredis, {"id": 7, "email": "ünïcode@exämple.com", "total": 3})
    await publish_event(
        aredis, {"id": 8, "email": "bob@exämple.com", "total": 3, "name": "Zoë Ünïcode"}
    )
    await run_burst(await make_service())

    by_id = {r.message["Message-ID"]: r for r in smtp.handler.received}
    utf8 = by_id["<order-7@orderflow.localhost>"]
    assert utf8.rcpt_tos == ["ünïcode@exämple.com"]
    assert utf8.smtp_utf8
    idna = by_id["<order-8@orderflow.localhost>"]
    assert idna.rcpt_tos == ["bob@xn--exmple-cua.com"]
    assert not idna.smtp_utf8
    assert idna.message["To"].addresses[0].display_name == "Zoë Ünïcode"


@pytest.mark.slow
@pytest.mark.chaos
async def test_smtp_down_holds_sends_without_spending_deliveries_then_sends_each_once(
    aredis: aioredis.Redis,
    smtp: SmtpFixture,
    settings: Settings,
    make_service: ServiceFactory,
) -> None:
    # A warm pooled connection first, so the outage also breaks open connections.
    await publish_event(aredis, {"id": 1, "email": "first@example.com", "total": 1})
    # Two deliveries only: without the gate, the outage would dead-letter every order.
    service = await make_service(
        settings.model_copy(update={"max_deliveries": 2}), concurrency=8, batch_size=10
    )
    service.gate.base_s = service.gate.max_s = 0.05
    task = asyncio.create_task(service.run())
    await wait_until(lambda: len(smtp.handler.received) == 1)

    await smtp.down()
    orders = [{"id": n, "email": f"u{n}@example.com", "total": n} for n in range(2, 52)]
    for order in orders:
        await publish_event(aredis, order)
    await wait_until(lambda: service.gate.is_open)
    assert REGISTRY.get_sample_value("orderflow_email_smtp_reachable") == 0
    # Probed again and again, well past two deliveries' worth of failures.
    await wait_until(lambda: service.gate.probes >= 10)
    assert await dead_letters(aredis) == []
    assert [e.type for e in await email_events(aredis)] == ["email.sent"]  # order 1 only
    assert service.worker.stats.retried == 0
    # Consumption paused: the worker read no more than it may hold (2 × max(8, 10)),
    # and none of those was delivered a second time.
    pending = await aredis.xpending_range("orders", "email-service", "-", "+", 100)
    assert 1 <= len(pending) <= 20 < len(orders)
    assert all(p["times_delivered"] == 1 for p in pending)

    await smtp.up()
    await wait_until(lambda: len(smtp.handler.received) == 1 + len(orders), timeout=15)
    await wait_until(_no_pending(aredis), timeout=10)
    assert not service.gate.is_open
    assert REGISTRY.get_sample_value("orderflow_email_smtp_reachable") == 1
    service.stop()
    await asyncio.wait_for(task, 10)

    ids = sorted(r.message["Message-ID"] for r in smtp.handler.received)
    assert ids == sorted(f"<order-{n}@orderflow.localhost>" for n in range(1, 52))
    assert await dead_letters(aredis) == []
    sent = [e for e in await email_events(aredis) if e.type == "email.sent"]
    assert sorted(e.data["order_id"] for e in sent) == list(range(1, 52))


async def test_stopping_during_an_smtp_outage_returns_promptly_leaving_entries_pending(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    await smtp.down()
    for n in range(1, 4):
        await publish_event(aredis, {"id": n, "email": f"u{n}@example.com", "total": n})
    service = await make_service()
    task = asyncio.create_task(service.run())
    await wait_until(lambda: service.gate.is_open)
    await wait_until(lambda: _pending_is(aredis, 3))

    service.stop()
    # Well before the worker's shutdown timeout (10 s): held sends are let go.
    await asyncio.wait_for(task, 5)
    assert smtp.handler.received == []
    assert await dead_letters(aredis) == []
    assert await pending_count(aredis) == 3
    # Nothing is left claimed in the ledger: the next worker sends them.
    for n in range(1, 4):
        assert not await aredis.exists(ledger_key(n))


def _pending_is(redis: aioredis.Redis, count: int) -> Any:
    async def check() -> bool:
        return await pending_count(redis) == count

    return check


def _no_pending(redis: aioredis.Redis) -> Any:
    async def check() -> bool:
        return await pending_count(redis) == 0

    return check


async def test_injection_attempts_add_no_header_or_recipient(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    evil = "evil@attacker.example"
    attempts: list[dict[str, Any]] = [
        {"id": 1, "email": f"a@example.com\r\nBcc: {evil}", "total": 1},
        {"id": 2, "email": f"a@example.com\nBcc: {evil}", "total": 1},
        {"id": 3, "email": f"a@example.com,{evil}", "total": 1},
        {"id": 4, "email": f"a@example.com>\r\nBcc: <{evil}", "total": 1},
        {"id": 5, "email": "a@example.com", "total": 1, "name": f"A\r\nBcc: {evil}"},
        {"id": 6, "email": "a@example.com", "total": 1, "currency": f"USD\r\nBcc: {evil}"},
        {"id": 7, "email": "a@example.com", "total": f"1\r\nBcc: {evil}"},
        {"id": f"8\r\nBcc: {evil}", "email": "a@example.com", "total": 1},
        {"id": 9, "email": "a@example.com", "total": 1, "items": [f"x\r\nBcc: {evil}"]},
        {"id": 10, "email": "a@example.com", "total": 1, "items": [{"sku": f"\nBcc: {evil}"}]},
        # Valid orders whose text merely looks like headers: rendered as text, nothing more.
        {"id": 11, "email": "b@example.com", "total": 1, "name": f"Bcc: {evil}"},
        {
            "id": 12,
            "email": "c@example.com",
            "total": 1,
            "name": f'x" <{evil}>, "y',
            "items": [{"name": f"Bcc: {evil}", "quantity": 1}],
        },
    ]
    for order in attempts:
        await aredis.xadd("orders", {"data": orjson.dumps(order)})
    # Headers are not a way in either.
    await publish_order(aredis, {"id": 13, "email": "d@example.com", "total": 1}, ce_id="x\r\ny")
    await run_burst(await make_service())

    received = smtp.handler.received
    assert sorted(r.rcpt_tos[0] for r in received) == [
        "b@example.com",
        "c@example.com",
        "d@example.com",
    ]
    allowed = {
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "X-Orderflow-Order-Id",
        "MIME-Version",
        "Content-Type",
    }
    for r in received:
        assert len(r.rcpt_tos) == 1
        msg = r.message
        assert set(msg.keys()) <= allowed
        assert len(msg.get_all("To") or []) == 1
        assert len(msg["To"].addresses) == 1
        assert evil not in r.rcpt_tos
        assert msg["To"].addresses[0].addr_spec == r.rcpt_tos[0]
    assert len(await dead_letters(aredis)) == 10


@pytest.mark.slow
async def test_a_send_slower_than_the_lease_is_not_repeated(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory
) -> None:
    # The server takes 1.5 s to accept, longer than the 1 s lease (claim_idle_ms). A
    # duplicate of the order reaches another worker after the first lease would have
    # run out: the lease, renewed while the send runs, keeps it from sending again.
    smtp.handler.delay_s = 1.5
    slow, other = await make_service(), await make_service()
    task = asyncio.create_task(slow.run())
    await slow.wait_started()
    await publish_event(aredis, ALICE)
    await wait_until(lambda: smtp.handler.data_attempts == 1)
    # Time passing is the scenario here: outlive the lease as first granted.
    await asyncio.sleep(1.1)
    assert await aredis.hget(ledger_key(101), "state") == b"sending"
    duplicate = Delivery(Message(data=ALICE), "1-1", "orders", 1)
    await asyncio.wait_for(other.handle(duplicate), 10)  # waits for the outcome
    await wait_until(_no_pending(aredis), timeout=10)
    slow.stop()
    await asyncio.wait_for(task, 10)

    assert smtp.handler.data_attempts == 1
    assert len(smtp.handler.received) == 1
    assert await dead_letters(aredis) == []
    assert await aredis.hget(ledger_key(101), "state") == b"sent"
    assert [e.type for e in await email_events(aredis)] == ["email.sent", "email.sent"]


async def test_mark_sent_and_email_sent_share_one_transaction(
    aredis: aioredis.Redis, smtp: SmtpFixture, make_service: ServiceFactory, settings: Settings
) -> None:
    # The ledger's record and the email.sent entry go in ONE round trip (one script):
    # counted by the server itself. The lease is long here: a send that outlasts a
    # third of it is renewed (a script call of its own), and with the suite's 1 s
    # lease a busy machine's slow send added renewals to the count below.
    await publish_event(aredis, {**ALICE, "id": 301})
    await publish_event(aredis, {**ALICE, "id": 302})
    service = await make_service(settings.model_copy(update={"claim_idle_ms": 60_000}))
    await aredis.config_resetstat()
    stats = await run_burst(service)

    assert stats.handled == 2
    commands = await aredis.info("commandstats")
    # Per email at most: the claim script and the mark-sent-and-append script, whose
    # XADD is the only one (commandstats counts a script's own calls too); the two
    # orders' claims go in one call (read together), their marks in one or two. The
    # journey's steps (two LPUSHes) go in script calls of their own, batched by time:
    # one or two. A script not yet in the server's cache costs a refused EVALSHA
    # (NOSCRIPT) first.
    assert commands["cmdstat_lpush"]["calls"] == 2
    scripts = [commands.get(f"cmdstat_{name}", {}) for name in ("eval", "evalsha")]
    calls = sum(c.get("calls", 0) - c.get("failed_calls", 0) for c in scripts)
    assert 2 + 1 <= calls <= 4 + 2
    assert commands["cmdstat_xadd"]["calls"] == 2
    events = await email_events(aredis)
    assert sorted(e.data["order_id"] for e in events) == [301, 302]
    assert {e.type for e in events} == {"email.sent"}
    for order_id in (301, 302):
        assert await aredis.hget(ledger_key(order_id), "state") == b"sent"
    assert len(smtp.handler.received) == 2
    assert await pending_count(aredis) == 0


async def test_the_event_never_exists_without_the_ledger_record(
    aredis: aioredis.Redis, make_service: ServiceFactory
) -> None:
    service = await make_service()
    ledger = service.ledger
    assert await ledger.mark_sent_and_append(
        401, "t", "<m>", "now", stream="email-events", fields=["data", "{}"]
    ) == (False, (await aredis.xrange("email-events"))[-1][0].decode())
    assert await aredis.hget(ledger_key(401), "state") == b"sent"
    # The record cannot be written (a foreign value on its key): no event either.
    await aredis.set(ledger_key(402), "not a hash")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await ledger.mark_sent_and_append(
            402, "t", "<m>", "now", stream="email-events", fields=["data", "{}"]
        )
    assert await aredis.xlen("email-events") == 1


def test_the_email_sent_payload_is_the_models() -> None:
    # Built without the model on the hot path: it must stay what the model gives.
    order = parse_order({"id": 7, "email": "Alice@Example.com", "total": 1})
    data = EmailService._sent_data(order, "<order-7@x>", "2026-12-02T10:00:01.250+00:00")
    model = EmailSent(order_id=7, email=order.email, message_id="<order-7@x>", at=data["at"])
    assert data == model.data()
    assert list(data) == list(model.data())
    assert EmailService._sent_data(order, "<m>", None)["at"].endswith("+00:00")
