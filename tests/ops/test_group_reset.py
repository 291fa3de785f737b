"""``orderflow group reset``: replay a group from a point, with real workers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis

from orderflow.bus import Delivery
from tests.ops.conftest import Cli, entry_ids, run_burst, state

GROUP = "email-service"
#: 2023-11-14T22:13:20Z: entries are added at this time and 1 and 2 seconds later.
BASE_MS = 1_700_000_000_000


class Recorder:
    """A handler that records the entry ids it handled."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.ids.append(delivery.entry_id)


def _consume(redis_url: str) -> list[str]:
    handler = Recorder()
    run_burst(redis_url, "orders", GROUP, handler)
    return sorted(handler.ids, key=lambda i: tuple(int(p) for p in i.split("-")))


def _timed_entries(client: redis.Redis) -> list[str]:
    """Five entries at BASE_MS, BASE_MS+1000 (two), BASE_MS+2000 (two)."""
    ids = []
    for offset, seq in [(0, 0), (1000, 0), (1000, 1), (2000, 0), (2000, 1)]:
        ids.append(client.xadd("orders", {"data": "{}"}, id=f"{BASE_MS + offset}-{seq}"))
    return [i.decode() for i in ids]


def test_reset_to_beginning_redelivers_acked_entries(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    for i in range(3):
        sync_redis.xadd("orders", {"data": f'{{"id": {i}}}'})
    first_run = _consume(redis_url)
    assert first_run == entry_ids(sync_redis.xrange("orders"))
    assert sync_redis.xpending("orders", GROUP)["pending"] == 0
    assert _consume(redis_url) == []

    result = cli("group", "reset", GROUP, "--to", "beginning")

    assert result.code == 0, result.err
    assert "3 entries to deliver" in result.out
    assert _consume(redis_url) == first_run


@pytest.mark.parametrize(
    "when",
    [
        "2023-11-14T22:13:21Z",
        "2023-11-14T22:13:21",  # no offset: UTC
        "2023-11-14T23:13:21+01:00",
        str(BASE_MS + 1000),  # epoch milliseconds
    ],
)
def test_reset_to_a_time_redelivers_entries_from_that_time(
    cli: Cli, sync_redis: redis.Redis, redis_url: str, when: str
) -> None:
    ids = _timed_entries(sync_redis)
    assert _consume(redis_url) == ids

    result = cli("group", "reset", GROUP, "--to", when)

    assert result.code == 0, result.err
    assert "time 2023-11-14T22:13:21.000+00:00" in result.out
    assert _consume(redis_url) == ids[1:]


def test_reset_to_an_id_redelivers_the_entries_after_it(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    ids = _timed_entries(sync_redis)
    _consume(redis_url)

    result = cli("group", "reset", GROUP, "--to", ids[2])

    assert result.code == 0, result.err
    assert _consume(redis_url) == ids[3:]


def test_reset_to_end_skips_what_is_there(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    sync_redis.xgroup_create("orders", GROUP, id="0", mkstream=True)
    for _ in range(3):
        sync_redis.xadd("orders", {"data": "{}"})

    result = cli("group", "reset", GROUP, "--to", "end")

    assert result.code == 0, result.err
    assert "0 entries to deliver" in result.out
    assert _consume(redis_url) == []
    new = sync_redis.xadd("orders", {"data": "{}"}).decode()
    assert _consume(redis_url) == [new]


def test_a_past_time_after_the_newest_entry_is_the_end(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    ids = _timed_entries(sync_redis)
    sync_redis.xgroup_create("orders", GROUP, id="0")

    result = cli("group", "reset", GROUP, "--to", "2024-01-01T00:00:00Z")

    assert result.code == 0, result.err
    (group,) = sync_redis.xinfo_groups("orders")
    assert group["last-delivered-id"].decode() == ids[-1]
    assert _consume(redis_url) == []


def test_pending_entries_stay_pending(cli: Cli, sync_redis: redis.Redis) -> None:
    _timed_entries(sync_redis)
    sync_redis.xgroup_create("orders", GROUP, id="0")
    sync_redis.xreadgroup(GROUP, "c1", {"orders": ">"}, count=2)
    pending_before = sync_redis.xpending_range("orders", GROUP, "-", "+", 10)

    result = cli("group", "reset", GROUP, "--to", "beginning")

    assert result.code == 0, result.err
    assert "2 pending entries stay pending" in result.out
    after = sync_redis.xpending_range("orders", GROUP, "-", "+", 10)
    assert [p["message_id"] for p in after] == [p["message_id"] for p in pending_before]


def test_help_says_pending_entries_stay_pending(cli: Cli) -> None:
    result = cli("group", "reset", "--help")

    assert result.code == 0
    assert "Pending entries stay pending" in result.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["group", "reset", "nope", "--to", "beginning"], "no group 'nope' on stream 'orders'"),
        (
            ["group", "reset", GROUP, "--to", "end", "--stream", "missing"],
            "no stream 'missing'",
        ),
    ],
)
def test_unknown_group_or_stream_exits_1_and_changes_nothing(
    cli: Cli, sync_redis: redis.Redis, argv: list[str], message: str
) -> None:
    _timed_entries(sync_redis)
    sync_redis.xgroup_create("orders", GROUP, id="0")
    before = state(sync_redis, "orders", "missing")

    result = cli(*argv)

    assert result.code == 1
    assert message in result.err
    assert state(sync_redis, "orders", "missing") == before


def test_time_to_id() -> None:
    from orderflow.bus.admin import MAX_ID_PART, parse_position

    position = parse_position("2023-11-14T22:13:21.5Z")
    assert position.id == f"{BASE_MS + 1499}-{MAX_ID_PART}"
    assert position.time_ms == BASE_MS + 1500
    assert parse_position("0").id == "0"
    assert parse_position("beginning").id == "0"
    assert parse_position("end").id == "$"
    assert parse_position(" 5-7 ").id == "5-7"
    assert datetime.fromtimestamp(BASE_MS / 1000, UTC).isoformat() == "2023-11-14T22:13:20+00:00"
