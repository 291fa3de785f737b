"""The email ledger's own contract, edge by edge (each test kills a mutant that survived
the service tests: see docs/MUTATION.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from orderflow.email import ClaimState, EmailLedger, ledger_key
from tests.support import wait_until
from tests.support.cutter import CommandCutter

#: How long a test waits for callers a broken batch would leave waiting for ever.
HANG_S = 10.0


@pytest.fixture
async def text_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client that answers ``str`` instead of ``bytes`` (``decode_responses=True``)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def cutter(redis_url: str) -> AsyncIterator[CommandCutter]:
    """A proxy to the shared (emptied) server that cuts or holds the commands a test names."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with CommandCutter(port) as proxy:
        yield proxy


@pytest.fixture
async def cut_redis(cutter: CommandCutter) -> AsyncIterator[aioredis.Redis]:
    """A client that talks to the shared server through ``cutter``."""
    client = cutter.client()
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    ("lease_ms", "sent_ttl_s", "named"), [(0, 1, "lease_ms"), (1, 0, "sent_ttl_s")]
)
async def test_a_bound_below_one_is_refused_by_name(
    aredis: aioredis.Redis, lease_ms: int, sent_ttl_s: int, named: str
) -> None:
    with pytest.raises(ValueError, match=rf"{named} must be positive, got 0"):
        EmailLedger(aredis, lease_ms=lease_ms, sent_ttl_s=sent_ttl_s)


async def test_the_smallest_bounds_are_accepted(aredis: aioredis.Redis) -> None:
    ledger = EmailLedger(aredis, lease_ms=1, sent_ttl_s=1)
    assert (ledger.lease_ms, ledger.sent_ttl_ms) == (1, 1000)


async def test_a_sent_claim_reports_the_recorded_message_id_and_time(
    aredis: aioredis.Redis,
) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    await ledger.claim(1, "me")
    assert await ledger.mark_sent(1, "me", "<m@x>", "2026-01-02T03:04:05Z")
    claim = await ledger.claim(1, "other")
    assert claim.state is ClaimState.SENT
    assert (claim.message_id, claim.at) == ("<m@x>", "2026-01-02T03:04:05Z")


async def test_a_sending_record_without_a_ttl_leaves_no_lease(aredis: aioredis.Redis) -> None:
    # PTTL answers -1 for a key without expiry (written by hand, or restored): the
    # caller is told 0 ms left, never a negative or made-up wait.
    await aredis.hset(ledger_key(2), mapping={"state": "sending", "token": "ghost"})
    claim = await EmailLedger(aredis, lease_ms=5000).claim(2, "me")
    assert claim.state is ClaimState.BUSY
    assert claim.lease_left_ms == 0


async def test_the_holder_releases_and_the_order_can_be_claimed_again(
    aredis: aioredis.Redis,
) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    await ledger.claim(3, "me")
    assert await ledger.release(3, "me") is True
    assert not await aredis.exists(ledger_key(3))
    assert (await ledger.claim(3, "next")).state is ClaimState.CLAIMED


async def test_the_ledger_works_on_a_client_that_decodes_replies(
    text_redis: aioredis.Redis,
) -> None:
    ledger = EmailLedger(text_redis, lease_ms=5000)
    assert (await ledger.claim(4, "me")).state is ClaimState.CLAIMED
    busy = await ledger.claim(4, "other")
    assert busy.state is ClaimState.BUSY
    assert 0 < busy.lease_left_ms <= 5000
    held, entry = await ledger.mark_sent_and_append(
        4, "me", "<m@x>", "now", stream="email-events", fields=["data", "{}"]
    )
    assert held
    assert entry is not None
    assert "-" in entry
    sent = await ledger.claim(4, "other")
    assert (sent.state, sent.message_id, sent.at) == (ClaimState.SENT, "<m@x>", "now")


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))


async def test_claims_asked_in_one_turn_go_in_one_script_call(aredis: aioredis.Redis) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    assert ledger.batched
    await ledger.claim(21, "earlier")
    await ledger.mark_sent_and_append(
        21, "earlier", "<m21>", "then", stream="email-events", fields=["data", "{}"]
    )
    await ledger.claim(22, "someone")
    await aredis.config_resetstat()
    claims = await asyncio.gather(*(ledger.claim(order, f"t{order}") for order in range(20, 30)))

    assert await _script_calls(aredis) == 1
    states = [claim.state for claim in claims]
    assert (
        states == [ClaimState.CLAIMED, ClaimState.SENT, ClaimState.BUSY] + [ClaimState.CLAIMED] * 7
    )
    assert (claims[1].message_id, claims[1].at) == ("<m21>", "then")
    assert 0 < claims[2].lease_left_ms <= 5000
    for order in (20, *range(23, 30)):
        assert await aredis.hmget(ledger_key(order), "state", "token") == [
            b"sending",
            f"t{order}".encode(),
        ]
        assert 0 < await aredis.pttl(ledger_key(order)) <= 5000


async def test_marks_asked_in_one_turn_go_in_one_script_call_each_after_its_record(
    aredis: aioredis.Redis,
) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    orders = range(30, 40)
    await asyncio.gather(*(ledger.claim(order, f"t{order}") for order in orders))

    async def mark(order: int, token: str) -> tuple[bool, str | None]:
        return await ledger.mark_sent_and_append(
            order, token, f"<m{order}>", "now", stream="email-events", fields=["order", str(order)]
        )

    await aredis.config_resetstat()
    # The last one's lease was lost to another sender: still marked, reported not held.
    marks = await asyncio.gather(
        *(mark(order, f"t{order}") for order in orders[:-1]), mark(39, "x")
    )

    assert await _script_calls(aredis) == 1
    assert [held for held, _ in marks] == [True] * 9 + [False]
    entries = await aredis.xrange("email-events")
    assert [entry_id.decode() for entry_id, _ in entries] == [entry for _, entry in marks]
    assert [fields[b"order"] for _, fields in entries] == [str(o).encode() for o in orders]
    for order in orders:
        record = await aredis.hgetall(ledger_key(order))
        assert record[b"state"] == b"sent"
        assert record[b"message_id"] == f"<m{order}>".encode()
        assert record[b"token"] == (f"t{order}".encode() if order != 39 else b"")
        assert await aredis.ttl(ledger_key(order)) > 29 * 24 * 3600
    # Retried after a lost reply: held, nothing appended again.
    again = await asyncio.gather(*(mark(order, f"t{order}") for order in orders[:-1]))
    assert again == [(True, None)] * 9
    assert await aredis.xlen("email-events") == 10


async def test_a_claim_retried_with_its_own_token_is_still_the_callers(
    aredis: aioredis.Redis,
) -> None:
    # A retry after a lost reply (or of a batch that failed part way) finds its own
    # lease: still claimed, renewed, never "busy" until the lease runs out.
    ledger = EmailLedger(aredis, lease_ms=5000)
    assert (await ledger.claim(41, "me")).state is ClaimState.CLAIMED
    await aredis.pexpire(ledger_key(41), 100)
    assert (await ledger.claim(41, "me")).state is ClaimState.CLAIMED
    assert await aredis.pttl(ledger_key(41)) > 100
    assert (await ledger.claim(41, "other")).state is ClaimState.BUSY


async def test_a_bad_key_in_a_batch_fails_only_its_own_order(aredis: aioredis.Redis) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    await aredis.set(ledger_key(53), "not a hash")
    claims = await asyncio.gather(
        *(ledger.claim(order, f"t{order}") for order in range(50, 56)), return_exceptions=True
    )
    # The batch's script stopped at order 53, after claiming 50 to 52: those are claimed
    # again, one by one, with the same tokens.
    assert isinstance(claims[3], Exception)
    assert "WRONGTYPE" in str(claims[3])
    assert [c.state for n, c in enumerate(claims) if n != 3] == [ClaimState.CLAIMED] * 5

    async def mark(order: int) -> tuple[bool, str | None]:
        return await ledger.mark_sent_and_append(
            order, f"t{order}", f"<m{order}>", "now", stream="email-events", fields=["o", "x"]
        )

    marks = await asyncio.gather(*(mark(order) for order in range(50, 56)), return_exceptions=True)
    assert isinstance(marks[3], Exception)
    assert [m[0] for n, m in enumerate(marks) if n != 3] == [True] * 5
    # Each order's event once: those marked (and appended) by the batch before the error
    # find their own mark and append nothing again (their entry ids went with the error).
    assert await aredis.xlen("email-events") == 5
    assert [m[1] is None for m in marks[:3]] == [True] * 3
    assert [m[1] is not None for m in marks[4:]] == [True] * 2


async def test_a_claim_cancelled_before_its_batch_is_sent_is_left_out(
    aredis: aioredis.Redis,
) -> None:
    ledger = EmailLedger(aredis, lease_ms=5000)
    gone = asyncio.create_task(ledger.claim(61, "gone"))
    kept = asyncio.create_task(ledger.claim(62, "kept"))
    await asyncio.sleep(0)  # both asked; their batch is not sent yet
    gone.cancel()
    assert (await kept).state is ClaimState.CLAIMED
    with pytest.raises(asyncio.CancelledError):
        await gone
    # Otherwise the order would stay leased to nobody until the lease ran out.
    assert not await aredis.exists(ledger_key(61))


async def test_one_call_per_order_where_batches_cannot_go(aredis: aioredis.Redis) -> None:
    # A cluster's orders live in different slots: each claim and mark is a call of its
    # own, with the same records and answers as a batch's.
    ledger = EmailLedger(aredis, lease_ms=5000)
    ledger.batched = False
    assert (await ledger.claim(71, "me")).state is ClaimState.CLAIMED
    assert await aredis.hget(ledger_key(71), "token") == b"me"
    assert (await ledger.claim(71, "other")).state is ClaimState.BUSY
    held, entry_id = await ledger.mark_sent_and_append(
        71, "me", "<m71>", "now", stream="email-events", fields=["order", "71"]
    )
    assert held
    assert entry_id is not None
    assert await aredis.xrange("email-events") == [(entry_id.encode(), {b"order": b"71"})]
    sent = await ledger.claim(71, "later")
    assert (sent.state, sent.message_id, sent.at) == (ClaimState.SENT, "<m71>", "now")


async def test_marks_of_two_streams_asked_in_one_turn_each_append_to_their_own_stream(
    aredis: aioredis.Redis,
) -> None:
    # One batched script call appends to one stream: a batch that names two is marked
    # order by order, each order's email.sent going to the stream it named.
    ledger = EmailLedger(aredis, lease_ms=5000)
    orders = range(80, 86)
    streams = {order: "email-events" if order % 2 else "audit-events" for order in orders}
    await asyncio.gather(*(ledger.claim(order, f"t{order}") for order in orders))
    marks = await asyncio.gather(
        *(
            ledger.mark_sent_and_append(
                order,
                f"t{order}",
                f"<m{order}>",
                "now",
                stream=streams[order],
                fields=["order", str(order)],
            )
            for order in orders
        )
    )

    assert [held for held, _ in marks] == [True] * 6
    for stream in ("email-events", "audit-events"):
        mine = [n for n, order in enumerate(orders) if streams[order] == stream]
        entries = await aredis.xrange(stream)
        assert [fields[b"order"] for _, fields in entries] == [
            str(orders[n]).encode() for n in mine
        ]
        assert [entry_id.decode() for entry_id, _ in entries] == [marks[n][1] for n in mine]
    for order in orders:
        assert await aredis.hmget(ledger_key(order), "state", "message_id") == [
            b"sent",
            f"<m{order}>".encode(),
        ]


async def test_a_batched_call_that_loses_its_connection_fails_every_caller_in_it(
    aredis: aioredis.Redis, cutter: CommandCutter, cut_redis: aioredis.Redis
) -> None:
    # The connection of a batch's script call is cut before Redis sees it: each caller
    # gets the error (none waits for ever), and asks again once Redis is back.
    ledger = EmailLedger(cut_redis, lease_ms=5000)
    orders = range(90, 94)
    cutter.cut = {b"EVAL"}
    claims = await asyncio.wait_for(
        asyncio.gather(
            *(ledger.claim(order, f"t{order}") for order in orders), return_exceptions=True
        ),
        HANG_S,
    )
    assert [type(claim) for claim in claims] == [RedisConnectionError] * 4
    assert not await aredis.exists(*(ledger_key(order) for order in orders))

    cutter.cut = set()
    claimed = await asyncio.gather(*(ledger.claim(order, f"t{order}") for order in orders))
    assert [claim.state for claim in claimed] == [ClaimState.CLAIMED] * 4

    async def mark(order: int) -> tuple[bool, str | None]:
        return await ledger.mark_sent_and_append(
            order, f"t{order}", f"<m{order}>", "now", stream="email-events", fields=["o", "x"]
        )

    cutter.cut = {b"EVAL"}
    marks = await asyncio.wait_for(
        asyncio.gather(*(mark(order) for order in orders), return_exceptions=True), HANG_S
    )
    assert [type(marked) for marked in marks] == [RedisConnectionError] * 4
    assert await aredis.xlen("email-events") == 0

    cutter.cut = set()
    marked = await asyncio.gather(*(mark(order) for order in orders))
    assert [held for held, _ in marked] == [True] * 4
    assert await aredis.xlen("email-events") == 4


async def test_a_caller_cancelled_while_its_batch_is_on_its_way_leaves_the_others_answered(
    cutter: CommandCutter, cut_redis: aioredis.Redis
) -> None:
    ledger = EmailLedger(cut_redis, lease_ms=5000)
    cutter.hold = {b"EVAL"}
    gone = asyncio.create_task(ledger.claim(101, "gone"))
    kept = [asyncio.create_task(ledger.claim(order, f"t{order}")) for order in (102, 103)]
    await wait_until(lambda: cutter.held.get(b"EVAL"), what="the batch's call sent")
    # The first caller of the batch goes while the call is out; its reply is dropped.
    gone.cancel()
    cutter.hold = set()
    cutter.release()
    claims = await asyncio.wait_for(asyncio.gather(*kept), HANG_S)
    assert [claim.state for claim in claims] == [ClaimState.CLAIMED] * 2
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert cutter.held == {b"EVAL": 1}


async def test_batches_leave_no_error_in_the_event_loop_and_no_task_behind(
    aredis: aioredis.Redis,
) -> None:
    # A batch's flush is a task of its own, kept until it is done and let go then; an
    # error in its done callback would go to the event loop's exception handler, which
    # only logs it ("Exception in callback"), at every batch.
    ledger = EmailLedger(aredis, lease_ms=5000)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        orders = range(110, 114)
        await asyncio.gather(*(ledger.claim(order, f"t{order}") for order in orders))
        await asyncio.gather(
            *(
                ledger.mark_sent_and_append(
                    order,
                    f"t{order}",
                    f"<m{order}>",
                    "now",
                    stream="email-events",
                    fields=["o", "x"],
                )
                for order in orders
            )
        )
        batches = (ledger._claims, ledger._marks)
        await wait_until(
            lambda: errors or not any(batch._tasks for batch in batches),
            what="the flush tasks let go",
        )
    finally:
        loop.set_exception_handler(None)
    assert errors == []
