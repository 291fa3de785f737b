"""``orderflow dlq list|replay|purge`` on dead letters made by a real worker."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from typing import Any

import pytest
import redis

from orderflow.bus import Delivery, Message, PermanentError, StreamPublisher, connect
from orderflow.cli import ops as cli_ops
from tests.ops.conftest import Cli, run_burst, state

GROUP = "email-service"


def _publish(url: str, *messages: Message) -> list[str]:
    async def go() -> list[str]:
        client = connect(url)
        try:
            return await StreamPublisher(client).publish_many("orders", list(messages))
        finally:
            await client.aclose()

    return asyncio.run(go())


def _dead_letter(client: redis.Redis, n: int, **extra: Any) -> list[str]:
    """``n`` dead letters of ``orders`` as the worker writes them."""
    ids = []
    for i in range(n):
        fields = {
            "data": json.dumps({"id": i}),
            "ce_id": f"event-{i}",
            "dlq_reason": "permanent failure: test",
            "dlq_time": "2026-01-02T03:04:05.678+00:00",
            "dlq_stream": "orders",
            "dlq_group": GROUP,
            "dlq_consumer": "c1",
            "dlq_deliveries": "1",
            "dlq_source_id": f"{1000 + i}-0",
            **extra,
        }
        ids.append(client.xadd("orders:dlq", fields).decode())  # type: ignore[arg-type]
    return ids


def test_replay_round_trips_a_dead_letter(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    bad = Message.event("order.created", {"id": 7, "email": "x@example.com"}, source="test")
    good = Message.event("order.created", {"id": 8, "email": "y@example.com"}, source="test")
    bad_id, _ = _publish(redis_url, bad, good)
    original = sync_redis.xrange("orders", bad_id, bad_id)[0][1]

    async def refuse_seven(delivery: Delivery) -> None:
        if delivery.message.data["id"] == 7:
            raise PermanentError("order 7 is refused")

    stats = run_burst(redis_url, "orders", GROUP, refuse_seven)
    assert (stats.handled, stats.dead_lettered) == (1, 1)

    listed = cli("dlq", "list", "--json")
    assert listed.code == 0, listed.err
    page = json.loads(listed.out)
    assert (page["stream"], page["dead_letter_stream"], page["total"]) == (
        "orders",
        "orders:dlq",
        1,
    )
    (entry,) = page["entries"]
    assert entry["source_id"] == bad_id
    assert entry["source_stream"] == "orders"
    assert entry["group"] == GROUP
    assert entry["reason"] == "permanent failure: order 7 is refused"
    assert entry["deliveries"] == 1
    assert entry["time"]
    assert entry["fields"] == {k.decode(): v.decode() for k, v in original.items()}
    assert '"id":7' in entry["preview"]

    replayed = cli("dlq", "replay", entry["id"])

    assert replayed.code == 0, replayed.err
    assert "replayed 1 dead letter" in replayed.out
    assert sync_redis.xlen("orders:dlq") == 0
    new_id, fields = sync_redis.xrange("orders")[-1]
    assert new_id.decode() not in (bad_id, entry["id"])
    assert fields == original  # the original fields, no dlq_* ones

    seen: list[Delivery] = []

    async def accept(delivery: Delivery) -> None:
        seen.append(delivery)

    stats = run_burst(redis_url, "orders", GROUP, accept)
    assert stats.handled == 1
    (delivery,) = seen
    assert delivery.entry_id == new_id.decode()
    assert delivery.message.id == bad.id
    assert dict(delivery.message.data) == dict(bad.data)
    assert sync_redis.xpending("orders", GROUP)["pending"] == 0


def test_list_shows_binary_junk_safely_and_replay_keeps_its_bytes(
    cli: Cli, sync_redis: redis.Redis
) -> None:
    junk = b"\xff\x00\x1b[31mjunk\n"
    sync_redis.xadd(
        "orders:dlq",
        {"data": junk, "dlq_reason": "malformed entry: not UTF-8", "dlq_stream": "orders"},
    )

    table = cli("dlq", "list")
    listed = cli("dlq", "list", "--json")

    assert table.code == 0, table.err
    assert "\x1b" not in table.out
    assert "\x00" not in table.out
    assert "\\xff\\x00\\x1b[31mjunk\\x0a" in table.out
    assert "malformed entry: not UTF-8" in table.out
    (entry,) = json.loads(listed.out)["entries"]
    assert entry["preview"] == "\\xff\\x00\\x1b[31mjunk\\x0a"
    assert entry["deliveries"] is None

    assert cli("dlq", "replay", entry["id"]).code == 0
    ((_, fields),) = sync_redis.xrange("orders")
    assert fields == {b"data": junk}


def test_list_limit_shows_the_oldest(cli: Cli, sync_redis: redis.Redis) -> None:
    ids = _dead_letter(sync_redis, 5)

    result = cli("dlq", "list", "--limit", "2", "--json")
    table = cli("dlq", "list", "--limit", "2")

    assert result.code == 0, result.err
    page = json.loads(result.out)
    assert page["total"] == 5
    assert [e["id"] for e in page["entries"]] == ids[:2]
    assert "showing 2 of 5" in table.out
    assert ids[0] in table.out
    assert ids[2] not in table.out


def test_list_of_no_dead_letters(cli: Cli) -> None:
    result = cli("dlq", "list", "--stream", "email-events")

    assert result.code == 0, result.err
    assert "no dead letters in email-events:dlq" in result.out


def test_replay_all_moves_every_dead_letter_in_order(cli: Cli, sync_redis: redis.Redis) -> None:
    count = cli_ops.PROGRESS_THRESHOLD + 230  # several batches
    _dead_letter(sync_redis, count)

    result = cli("dlq", "replay", "--all")

    assert result.code == 0, result.err
    assert f"replayed {count} dead letters from orders:dlq" in result.out
    assert sync_redis.xlen("orders:dlq") == 0
    rows = sync_redis.xrange("orders")
    assert [json.loads(f[b"data"])["id"] for _, f in rows] == list(range(count))
    names: set[Any] = {name for _, fields in rows for name in fields}
    assert names == {b"data", b"ce_id"}


def test_replay_unknown_id_changes_nothing_for_it(cli: Cli, sync_redis: redis.Redis) -> None:
    known, kept = _dead_letter(sync_redis, 2)

    result = cli("dlq", "replay", known, "1-1")

    assert result.code == 1
    assert "no dead letter 1-1 in orders:dlq" in result.err
    assert "replayed 1 dead letter " in result.out
    assert [i.decode() for i, _ in sync_redis.xrange("orders:dlq")] == [kept]
    assert sync_redis.xlen("orders") == 1


def test_purge_ids(cli: Cli, sync_redis: redis.Redis) -> None:
    first, second, third = _dead_letter(sync_redis, 3)

    result = cli("dlq", "purge", first, third)

    assert result.code == 0, result.err
    assert "purged 2 dead letters from orders:dlq" in result.out
    assert [i.decode() for i, _ in sync_redis.xrange("orders:dlq")] == [second]
    assert not sync_redis.exists("orders")

    unknown = cli("dlq", "purge", first, second)
    assert unknown.code == 1
    assert f"no dead letter {first}" in unknown.err
    assert sync_redis.xlen("orders:dlq") == 0


def test_purge_all_needs_yes(cli: Cli, sync_redis: redis.Redis) -> None:
    _dead_letter(sync_redis, 3)
    before = state(sync_redis, "orders")

    refused = cli("dlq", "purge", "--all")

    assert refused.code == 2
    assert "--yes" in refused.err
    assert state(sync_redis, "orders") == before

    purged = cli("dlq", "purge", "--all", "--yes")
    assert purged.code == 0, purged.err
    assert "purged 3 dead letters" in purged.out
    assert sync_redis.xlen("orders:dlq") == 0


class _Terminal(io.StringIO):
    """A stdin that says it is a terminal, with the operator's answer in it."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "code", "left"), [("n\n", 1, 2), ("y\n", 0, 0), ("", 1, 2)])
def test_purge_all_asks_on_a_terminal(
    cli: Cli,
    sync_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    code: int,
    left: int,
) -> None:
    _dead_letter(sync_redis, 2)
    monkeypatch.setattr(sys, "stdin", _Terminal(answer))

    result = cli("dlq", "purge", "--all")

    assert result.code == code, result.err
    assert "Delete all 2 dead letters in orders:dlq?" in result.out
    assert sync_redis.xlen("orders:dlq") == left


def test_other_streams_dead_letters(cli: Cli, sync_redis: redis.Redis) -> None:
    sync_redis.xadd("email-events:dlq", {"data": "{}", "dlq_stream": "email-events"})
    _dead_letter(sync_redis, 1)

    result = cli("dlq", "replay", "--all", "--stream", "email-events")

    assert result.code == 0, result.err
    assert sync_redis.xlen("email-events") == 1
    assert sync_redis.xlen("orders:dlq") == 1
