"""The email ledger's own contract, edge by edge (each test kills a mutant that survived
the service tests: see docs/MUTATION.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from orderflow.email import ClaimState, EmailLedger, ledger_key


@pytest.fixture
async def text_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client that answers ``str`` instead of ``bytes`` (``decode_responses=True``)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
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
