"""Operator commands on a Redis Cluster: they find every partition from what Redis records.

``streams info``, ``dlq list|replay|purge``, ``group reset`` and the /metrics gauges on
the real 3+3 cluster, with dead letters made by real partitioned workers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.cluster import RedisCluster

from orderflow.bus import Delivery, PermanentError
from orderflow.bus import admin as ops
from orderflow.bus.partitions import (
    DEFAULT_CLUSTER_PARTITIONS,
    PartitionLayout,
    layout_key,
    resolve_layout,
)
from orderflow.config import Settings
from tests.conftest import expected_server
from tests.ops.conftest import (
    CliResult,
    add_partitioned_orders,
    burst_partitioned,
    cli_runner,
    entry_ids,
    state,
)
from tests.orders.conftest import running_api

pytestmark = pytest.mark.slow

GROUP = "email-service"
LAYOUT = PartitionLayout("orders", DEFAULT_CLUSTER_PARTITIONS, tagged=True)
NAMES = LAYOUT.names


@pytest.fixture
def ccli(
    cluster_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """Run ``orderflow ARGS...`` in this process against the cluster."""
    return cli_runner(cluster_url, monkeypatch, capsys)


@pytest.fixture
def sync_cluster(cluster_url: str) -> Iterator[Any]:
    """A plain cluster client (bytes), to set up and check what the cluster holds."""
    client = RedisCluster.from_url(cluster_url)
    yield client
    client.close()


def _refusing(orders: set[int]) -> Any:
    async def handler(delivery: Delivery) -> None:
        if delivery.message.data["id"] in orders:
            raise PermanentError("refused")

    return handler


def _dead_letters(client: Any) -> dict[str, int]:
    return {name: int(client.xlen(f"{name}:dlq")) for name in NAMES}


def test_info_reports_every_partition_and_the_sum(
    ccli: Callable[..., CliResult], sync_cluster: Any, cluster_url: str
) -> None:
    add_partitioned_orders(sync_cluster, LAYOUT, range(30))
    stats = burst_partitioned(cluster_url, LAYOUT, GROUP, _refusing({3, 4, 5}))
    assert stats.dead_lettered == 3
    # Three more orders, not read yet: lag 3 in all.
    add_partitioned_orders(sync_cluster, LAYOUT, range(30, 33))

    result = ccli("streams", "info", "--json")

    assert result.code == 0, result.err
    orders, events = json.loads(result.out)["streams"]
    # email-events is a single stream, hash-tagged on a cluster.
    assert events["name"] == "{email-events}"
    assert events["partitions"] == []
    assert orders["name"] == "orders"
    assert [p["name"] for p in orders["partitions"]] == NAMES
    lengths = [int(sync_cluster.xlen(n)) for n in NAMES]
    assert [p["length"] for p in orders["partitions"]] == lengths
    assert orders["length"] == sum(lengths) == 33
    assert orders["dead_letters"] == 3
    assert [p["dead_letters"] for p in orders["partitions"]] == list(
        _dead_letters(sync_cluster).values()
    )
    (group,) = orders["groups"]
    assert group["name"] == GROUP
    assert group["lag"] == 3
    assert group["pending"] == 0
    # Redis 6.2's XINFO GROUPS has no entries-read (the lag is counted there).
    server = json.loads(result.out)["server"]
    assert group["entries_read"] == (30 if server["features"]["xinfo_lag"] else None)
    assert server == {**expected_server(), "mode": "cluster"}
    assert sum(p["groups"][0]["lag"] for p in orders["partitions"]) == 3
    table = ccli("streams", "info")
    assert f"orders (Σ {LAYOUT.count} partitions)" in table.out


def test_dlq_list_replay_purge_across_the_cluster(
    ccli: Callable[..., CliResult], sync_cluster: Any, cluster_url: str
) -> None:
    add_partitioned_orders(sync_cluster, LAYOUT, range(40))
    refused = set(range(0, 40, 4))
    stats = burst_partitioned(cluster_url, LAYOUT, GROUP, _refusing(refused))
    assert stats.dead_lettered == len(refused)
    spread = _dead_letters(sync_cluster)
    assert sum(1 for n in spread.values() if n) > 1, spread

    listed = ccli("dlq", "list", "--limit", "100", "--json")

    assert listed.code == 0, listed.err
    page = json.loads(listed.out)
    assert page["total"] == len(refused)
    assert {p["dead_letter_stream"]: p["total"] for p in page["partitions"]} == {
        f"{n}:dlq": c for n, c in spread.items()
    }
    for entry in page["entries"]:
        order = json.loads(entry["fields"]["data"])["id"]
        assert entry["dead_letter_stream"] == f"{LAYOUT.for_key(order)}:dlq"

    replayed = ccli("dlq", "replay", "--all")

    assert replayed.code == 0, replayed.err
    assert f"replayed {len(refused)} dead letters" in replayed.out
    assert sum(_dead_letters(sync_cluster).values()) == 0
    for order in refused:
        rows = sync_cluster.xrange(LAYOUT.for_key(order))
        assert sum(json.loads(f[b"data"])["id"] == order for _, f in rows) == 2

    # Refused again, then purged everywhere.
    assert burst_partitioned(cluster_url, LAYOUT, GROUP, _refusing(refused)).dead_lettered == len(
        refused
    )
    purged = ccli("dlq", "purge", "--all", "--yes")
    assert purged.code == 0, purged.err
    assert f"purged {len(refused)} dead letters" in purged.out
    assert sum(_dead_letters(sync_cluster).values()) == 0


def test_group_reset_on_every_partition_of_the_cluster(
    ccli: Callable[..., CliResult], sync_cluster: Any, cluster_url: str
) -> None:
    add_partitioned_orders(sync_cluster, LAYOUT, range(24))
    seen: list[str] = []

    async def record(delivery: Delivery) -> None:
        seen.append(delivery.entry_id)

    burst_partitioned(cluster_url, LAYOUT, GROUP, record)
    assert len(seen) == 24
    everything = sorted(i for n in NAMES for i in entry_ids(sync_cluster.xrange(n)))
    before = state(sync_cluster, *NAMES)

    refused = ccli("group", "reset", GROUP, "--to", "2999-01-01T00:00:00Z")
    assert refused.code == 2
    assert state(sync_cluster, *NAMES) == before

    result = ccli("group", "reset", GROUP, "--to", "beginning")

    assert result.code == 0, result.err
    assert f"moved on {LAYOUT.count} of {LAYOUT.count} partitions" in result.out
    assert "24 entries to deliver" in result.out
    seen.clear()
    burst_partitioned(cluster_url, LAYOUT, GROUP, record)
    assert sorted(seen) == everything


async def test_metrics_gauges_per_partition_on_the_cluster(
    cluster_settings: Settings, acluster: aioredis.Redis
) -> None:
    layout = await resolve_layout(acluster, "orders")
    for order in range(12):
        await acluster.xadd(layout.for_key(order), {"data": "{}"})
    await acluster.xadd(f"{layout.names[4]}:dlq", {"data": "{}"})

    async with running_api(cluster_settings) as api:
        response = await api.client.get("/metrics")

    assert response.status_code == 200
    for name in layout.names:
        length = int(await acluster.xlen(name))
        assert f'orderflow_stream_length{{stream="{name}"}} {float(length)}' in response.text
        assert REGISTRY.get_sample_value("orderflow_stream_length", {"stream": name}) == length
        expected = 1 if name == layout.names[4] else 0
        assert REGISTRY.get_sample_value("orderflow_dead_letters", {"stream": name}) == expected
    assert sum([int(await acluster.xlen(n)) for n in layout.names]) == 12


async def test_ops_find_the_recorded_partitions_without_writing(
    acluster: aioredis.Redis,
) -> None:
    # Nothing recorded: the single hash-tagged stream, and nothing written.
    assert await ops.stream_partitions(acluster, "orders") == ["{orders}"]
    assert not await acluster.exists(layout_key("orders"))
    layout = await resolve_layout(acluster, "orders", 3)
    assert await ops.stream_partitions(acluster, "orders") == layout.names
    assert await ops.dead_letter_streams(acluster, "orders") == [f"{n}:dlq" for n in layout.names]
    assert await ops.stream_partitions(acluster, "{orders:1}") == ["{orders:1}"]
