"""Operator commands on a partitioned stream on one server: they find the partitions.

The partition count is recorded in Redis as the components record it; no command is
told it. Dead letters are made by a real partitioned worker.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orderflow.bus import Delivery, PermanentError
from orderflow.bus import admin as ops
from orderflow.bus.partitions import PartitionLayout, layout_key, partition_of, resolve_layout
from tests.ops.conftest import (
    Cli,
    add_partitioned_orders,
    burst_partitioned,
    entry_ids,
    state,
)

GROUP = "email-service"
COUNT = 3
LAYOUT = PartitionLayout("orders", COUNT)
NAMES = LAYOUT.names


def _refusing(*orders: int) -> Any:
    async def handler(delivery: Delivery) -> None:
        if delivery.message.data["id"] in orders:
            raise PermanentError(f"order {delivery.message.data['id']} refused")

    return handler


def _spread(ids: range) -> list[int]:
    """Order ids from ``ids``, at least one in every partition."""
    chosen: dict[int, int] = {}
    for order in ids:
        chosen.setdefault(partition_of(order, COUNT), order)
    assert len(chosen) == COUNT
    return sorted(chosen.values())


def test_info_describes_every_partition_and_their_sum(cli: Cli, sync_redis: redis.Redis) -> None:
    add_partitioned_orders(sync_redis, LAYOUT, range(12))
    for name in NAMES:
        sync_redis.xgroup_create(name, GROUP, id="0")
    # c1 reads 2 entries of partition 0 and 1 of partition 2, acks one of partition 0;
    # group audit exists on partition 1 only; 1 dead letter in partitions 0 and 2 each.
    sync_redis.xreadgroup(GROUP, "c1", {NAMES[0]: ">"}, count=2)
    sync_redis.xreadgroup(GROUP, "c1", {NAMES[2]: ">"}, count=1)
    first: Any = sync_redis.xrange(NAMES[0], count=1)[0][0]
    sync_redis.xack(NAMES[0], GROUP, first)
    sync_redis.xgroup_create(NAMES[1], "audit", id="0")
    sync_redis.xreadgroup(GROUP, "c2", {NAMES[1]: ">"}, count=1)
    for name in (NAMES[0], NAMES[2]):
        sync_redis.xadd(f"{name}:dlq", {"data": "{}", "dlq_stream": name})

    result = cli("streams", "info", "--stream", "orders", "--json")

    assert result.code == 0, result.err
    (orders,) = json.loads(result.out)["streams"]
    parts = orders["partitions"]
    assert [p["name"] for p in parts] == NAMES
    assert [p["dead_letter_stream"] for p in parts] == [f"{n}:dlq" for n in NAMES]
    assert all(p["partitions"] == [] for p in parts)
    lengths = [sync_redis.xlen(n) for n in NAMES]
    assert [p["length"] for p in parts] == lengths
    assert [p["dead_letters"] for p in parts] == [1, 0, 1]
    # The sum.
    assert orders["name"] == "orders"
    assert orders["exists"] is True
    assert orders["length"] == sum(lengths) == 12
    # Redis 6.2's XINFO reports neither entries added nor lag: orderflow counts the lag.
    reported = "lag" in sync_redis.xinfo_groups(NAMES[0])[0]
    assert orders["entries_added"] == (12 if reported else None)
    assert orders["memory_bytes"] == sum(sync_redis.memory_usage(n) for n in NAMES)
    assert orders["dead_letters"] == 2
    assert orders["dead_letter_stream"] == "orders:dlq"
    every = sorted((r[0].decode() for n in NAMES for r in sync_redis.xrange(n)), key=_id_key)
    assert orders["first_entry_id"] == every[0]
    assert orders["last_entry_id"] == every[-1]
    groups = {g["name"]: g for g in orders["groups"]}
    assert set(groups) == {GROUP, "audit"}
    service = groups[GROUP]
    redis_groups = [
        next(g for g in sync_redis.xinfo_groups(n) if g["name"] == GROUP.encode()) for n in NAMES
    ]
    assert service["pending"] == sum(g["pending"] for g in redis_groups) == 3
    assert service["lag"] == 12 - 4
    if reported:
        assert service["lag"] == sum(g["lag"] for g in redis_groups)
    assert service["entries_read"] == (4 if reported else None)
    oldest = min((sync_redis.xpending(n, GROUP)["min"].decode() for n in NAMES), key=_id_key)
    assert service["oldest_pending_id"] == oldest
    assert service["oldest_pending_consumer"] in ("c1", "c2")
    assert service["oldest_pending_age_ms"] >= 0
    consumers = {c["name"]: c for c in service["consumers"]}
    assert consumers["c1"]["pending"] == 2
    assert consumers["c2"]["pending"] == 1
    # audit: only partition 1's figures.
    assert groups["audit"]["lag"] == lengths[1]
    assert groups["audit"]["pending"] == 0

    table = cli("streams", "info", "--stream", "orders")
    assert table.code == 0, table.err
    assert "orders (Σ 3 partitions)" in table.out
    for name in NAMES:
        assert name in table.out


def test_info_of_a_partitioned_stream_not_written_yet(cli: Cli, sync_redis: redis.Redis) -> None:
    sync_redis.set(layout_key("orders"), COUNT)

    result = cli("streams", "info", "--stream", "orders", "--json")

    assert result.code == 0, result.err
    (orders,) = json.loads(result.out)["streams"]
    assert orders["exists"] is False
    assert orders["length"] == 0
    assert orders["first_entry_id"] is None
    assert orders["entries_added"] is None
    assert [p["exists"] for p in orders["partitions"]] == [False] * COUNT


def test_a_partition_is_named_alone_with_braces(cli: Cli, sync_redis: redis.Redis) -> None:
    add_partitioned_orders(sync_redis, LAYOUT, range(6))

    result = cli("streams", "info", "--stream", NAMES[1], "--json")

    assert result.code == 0, result.err
    (part,) = json.loads(result.out)["streams"]
    assert (part["name"], part["length"], part["partitions"]) == (
        NAMES[1],
        sync_redis.xlen(NAMES[1]),
        [],
    )


def test_dlq_list_replay_and_purge_cover_every_partition(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    entries = add_partitioned_orders(sync_redis, LAYOUT, range(30))
    refused = _spread(range(30))
    stats = burst_partitioned(redis_url, LAYOUT, GROUP, _refusing(*refused))
    assert (stats.handled, stats.dead_lettered) == (30 - len(refused), len(refused))

    listed = cli("dlq", "list", "--json")

    assert listed.code == 0, listed.err
    page = json.loads(listed.out)
    assert page["stream"] == "orders"
    assert page["dead_letter_stream"] == "orders:dlq"
    assert page["total"] == len(refused)
    assert page["partitions"] == [{"dead_letter_stream": f"{n}:dlq", "total": 1} for n in NAMES]
    by_order = {json.loads(e["fields"]["data"])["id"]: e for e in page["entries"]}
    assert sorted(by_order) == refused
    for order, entry in by_order.items():
        home = LAYOUT.for_key(order)
        assert entry["dead_letter_stream"] == f"{home}:dlq"
        assert entry["source_stream"] == home
        assert entry["source_id"] == entries[order]
    assert [e["id"] for e in page["entries"]] == sorted(
        (e["id"] for e in page["entries"]), key=_id_key
    )
    table = cli("dlq", "list")
    assert "orders:dlq (3 partitions)" in table.out
    assert f"{NAMES[2]}:dlq" in table.out

    limited = json.loads(cli("dlq", "list", "--limit", "1", "--json").out)
    assert limited["total"] == len(refused)
    assert [e["id"] for e in limited["entries"]] == [page["entries"][0]["id"]]

    replayed = cli("dlq", "replay", "--all")

    assert replayed.code == 0, replayed.err
    assert f"replayed {len(refused)} dead letters from 3 partitions" in replayed.out
    assert all(sync_redis.xlen(f"{n}:dlq") == 0 for n in NAMES)
    for order in refused:
        # Back in its own partition, as its last entry.
        home = LAYOUT.for_key(order)
        _, fields = sync_redis.xrange(home)[-1]
        assert json.loads(fields[b"data"])["id"] == order

    # Refused again: dead letters again, then purged by id and all at once.
    stats = burst_partitioned(redis_url, LAYOUT, GROUP, _refusing(*refused))
    assert stats.dead_lettered == len(refused)
    page = json.loads(cli("dlq", "list", "--json").out)
    one = page["entries"][0]
    # Workers of different partitions often dead-letter in the same millisecond, so
    # the id alone may name two dead letters: name the partition.
    home = one["dead_letter_stream"].removesuffix(":dlq")
    purged = cli("dlq", "purge", one["id"], "--stream", home)
    assert purged.code == 0, purged.err
    assert f"purged 1 dead letter from {home}:dlq" in purged.out
    assert sync_redis.xlen(one["dead_letter_stream"]) == 0
    assert ops_total(sync_redis) == len(refused) - 1

    everything = cli("dlq", "purge", "--all", "--yes")
    assert everything.code == 0, everything.err
    assert f"purged {len(refused) - 1} dead letters" in everything.out
    assert ops_total(sync_redis) == 0
    assert cli("dlq", "purge", "--all", "--yes").out.startswith("no dead letters in 3 partitions")


def ops_total(client: redis.Redis) -> int:
    """Dead letters over every partition, as Redis counts them."""
    return sum(int(client.xlen(f"{n}:dlq")) for n in NAMES)


def test_an_id_in_two_partitions_is_refused_until_one_is_named(
    cli: Cli, sync_redis: redis.Redis
) -> None:
    sync_redis.set(layout_key("orders"), COUNT)
    for name in NAMES[:2]:
        sync_redis.xadd(f"{name}:dlq", {"data": f'"{name}"', "dlq_stream": name}, id="5-1")
    before = state(sync_redis, *NAMES)

    for action in ("replay", "purge"):
        result = cli("dlq", action, "5-1")
        assert result.code == 1, result
        assert "5-1 is in {orders:0}:dlq and {orders:1}:dlq" in result.err
        assert "--stream" in result.err
        assert state(sync_redis, *NAMES) == before

    named = cli("dlq", "replay", "5-1", "--stream", NAMES[1])

    assert named.code == 0, named.err
    assert f"from {NAMES[1]}:dlq" in named.out
    assert sync_redis.xlen(f"{NAMES[0]}:dlq") == 1
    assert sync_redis.xlen(f"{NAMES[1]}:dlq") == 0
    ((_, fields),) = sync_redis.xrange(NAMES[1])
    assert fields == {b"data": b'"{orders:1}"'}


def test_replay_of_unknown_ids_on_partitions_reports_them(
    cli: Cli, sync_redis: redis.Redis
) -> None:
    sync_redis.set(layout_key("orders"), COUNT)
    known = sync_redis.xadd(f"{NAMES[2]}:dlq", {"data": "{}"}).decode()

    result = cli("dlq", "replay", known, "1-1")

    assert result.code == 1
    assert "no dead letter 1-1 in 3 partitions" in result.err
    assert "replayed 1 dead letter from" in result.out
    # Without a dlq_stream field, it still goes back to the partition it is in.
    assert sync_redis.xlen(NAMES[2]) == 1


def test_group_reset_moves_the_group_on_every_partition(
    cli: Cli, sync_redis: redis.Redis, redis_url: str
) -> None:
    add_partitioned_orders(sync_redis, LAYOUT, range(9))
    seen: list[str] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    burst_partitioned(redis_url, LAYOUT, GROUP, record)
    assert len(seen) == 9
    before = {n: entry_ids(sync_redis.xrange(n)) for n in NAMES}
    seen.clear()

    result = cli("group", "reset", GROUP, "--to", "beginning")

    assert result.code == 0, result.err
    assert "moved on 3 of 3 partitions" in result.out
    assert "9 entries to deliver" in result.out
    for name in NAMES:
        assert f"{name}: {before[name][-1]} → 0-0" in result.out
    burst_partitioned(redis_url, LAYOUT, GROUP, record)
    assert sorted(seen) == sorted(i for ids in before.values() for i in ids)

    seen.clear()
    assert cli("group", "reset", GROUP, "--to", "end").code == 0
    for name in NAMES:
        (group,) = sync_redis.xinfo_groups(name)
        assert group["last-delivered-id"].decode() == before[name][-1]
    burst_partitioned(redis_url, LAYOUT, GROUP, record)
    assert seen == []


def test_group_reset_to_an_id_clamps_each_partition_to_its_newest(
    cli: Cli, sync_redis: redis.Redis
) -> None:
    sync_redis.set(layout_key("orders"), COUNT)
    # Partition 0 ends at 1000-0, 1 at 3000-0, 2 at 2000-0.
    for name, ms in zip(NAMES, (1000, 3000, 2000), strict=True):
        sync_redis.xadd(name, {"data": "{}"}, id=f"{ms - 500}-0")
        sync_redis.xadd(name, {"data": "{}"}, id=f"{ms}-0")
        sync_redis.xgroup_create(name, GROUP, id="$")

    result = cli("group", "reset", GROUP, "--to", "1500-0")

    assert result.code == 0, result.err
    moved = {n: sync_redis.xinfo_groups(n)[0]["last-delivered-id"].decode() for n in NAMES}
    assert moved == {NAMES[0]: "1000-0", NAMES[1]: "1500-0", NAMES[2]: "1500-0"}
    assert "2 entries to deliver" in result.out  # 3000-0 and 2000-0


def test_group_reset_leaves_partitions_without_the_group(cli: Cli, sync_redis: redis.Redis) -> None:
    add_partitioned_orders(sync_redis, LAYOUT, range(9))
    sync_redis.xgroup_create(NAMES[0], GROUP, id="$")

    result = cli("group", "reset", GROUP, "--to", "beginning")

    assert result.code == 0, result.err
    assert "moved on 1 of 3 partitions" in result.out
    assert f"{NAMES[1]}: no group {GROUP} there" in result.out
    assert sync_redis.xinfo_groups(NAMES[1]) == []

    missing = cli("group", "reset", "nobody", "--to", "beginning")
    assert missing.code == 1
    assert "no group 'nobody' on any of the 3 partitions of 'orders'" in missing.err


@pytest.mark.parametrize(
    "argv",
    [
        ["group", "reset", GROUP, "--to", "99999999999999-0"],
        ["group", "reset", GROUP, "--to", "2999-01-01T00:00:00Z"],
        ["dlq", "replay", "abc"],
        ["dlq", "purge", "--all"],
    ],
    ids=" ".join,
)
def test_bad_arguments_on_partitions_exit_2_and_change_nothing(
    cli: Cli, sync_redis: redis.Redis, argv: list[str]
) -> None:
    add_partitioned_orders(sync_redis, LAYOUT, range(9))
    for name in NAMES:
        sync_redis.xgroup_create(name, GROUP, id="0")
        sync_redis.xadd(f"{name}:dlq", {"data": "{}", "dlq_stream": name})
    before = state(sync_redis, *NAMES)

    result = cli(*argv)

    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert state(sync_redis, *NAMES) == before


async def test_metrics_gauges_cover_every_partition(
    aredis: aioredis.Redis, sync_redis: redis.Redis
) -> None:
    layout = await resolve_layout(aredis, "orders", COUNT)
    assert layout.names == NAMES
    for order in range(9):
        sync_redis.xadd(layout.for_key(order), {"data": "{}"})
    for name in NAMES:
        sync_redis.xgroup_create(name, GROUP, id="0", mkstream=True)
    sync_redis.xreadgroup(GROUP, "c1", {NAMES[1]: ">"}, count=1)
    sync_redis.xadd(f"{NAMES[2]}:dlq", {"data": "{}"})

    await ops.record_stream_metrics(aredis, ["orders"])

    def gauge(metric: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(metric, labels)

    for name in NAMES:
        length = sync_redis.xlen(name)
        assert gauge("orderflow_stream_length", stream=name) == length
        assert gauge("orderflow_group_lag", stream=name, group=GROUP) == length - (name == NAMES[1])
        assert gauge("orderflow_group_pending", stream=name, group=GROUP) == (name == NAMES[1])
        assert gauge("orderflow_dead_letters", stream=name) == (name == NAMES[2])
    age = gauge("orderflow_group_oldest_pending_age_seconds", stream=NAMES[1], group=GROUP)
    assert age is not None
    assert age >= 0


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)
