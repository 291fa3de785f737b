"""Cluster case: publish + consume throughput, 1 partition on one server vs N on a cluster.

Publishes ``count`` orders in relay-sized batches (500, one pipeline per partition),
then drains them with one worker process's consumers (no-op handler, burst mode).
Run alone: ``python -m bench.case_cluster [--count N] [--partitions N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from orderflow.bus import Delivery, Message, WorkerConfig
from orderflow.bus.connection import connect
from orderflow.bus.partition_workers import PartitionedWorker
from orderflow.bus.partitions import PartitionedPublisher, resolve_layout
from orderflow.embedded.redis_server import RedisServer

CASE = "cluster"
BATCH = 500


def _message(i: int) -> Message:
    data = {"id": i, "email": f"buyer{i}@example.com", "total": "100.00", "currency": "EUR"}
    return Message.event("order.created", data, source="bench")


async def _noop(_: Delivery) -> None:
    return None


async def measure(url: str, partitions: int, count: int) -> dict[str, Any]:
    """Publish then consume ``count`` orders over ``partitions``; rates in entries/s."""
    redis = connect(url)
    try:
        layout = await resolve_layout(redis, "orders", partitions)
        publisher = PartitionedPublisher(redis)
        messages = [_message(i) for i in range(count)]
        started = time.perf_counter()
        for start in range(0, count, BATCH):
            chunk = messages[start : start + BATCH]
            await publisher.publish_keyed(layout, [(m.data["id"], m) for m in chunk])
        publish_s = time.perf_counter() - started
        config = WorkerConfig(stream=layout.names[0], group="bench", concurrency=64)
        worker = PartitionedWorker(redis, layout, config, _noop)
        started = time.perf_counter()
        stats = await worker.run(burst=True)
        consume_s = time.perf_counter() - started
        assert stats.acked == count, (stats, count)
        return {
            "partitions": layout.count,
            "names": f"{layout.names[0]}..",
            "publish_per_s": round(count / publish_s),
            "consume_per_s": round(count / consume_s),
        }
    finally:
        await redis.aclose()


async def run(count: int, partitions: int) -> list[dict[str, Any]]:
    """Both setups, one after the other, each on servers started here."""
    from tests.cluster.harness import LocalCluster  # the test harness starts the cluster

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "single", appendfsync="everysec")
        server.start()
        try:
            results.append({"setup": "1 server", **await measure(server.url, 1, count)})
        finally:
            server.stop()
        cluster = LocalCluster(Path(tmp) / "cluster")
        cluster.start()
        try:
            results.append(
                {"setup": "3-master cluster", **await measure(cluster.url, partitions, count)}
            )
        finally:
            cluster.stop()
    return results


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()
    for row in asyncio.run(run(args.count, args.partitions)):
        print(row)


if __name__ == "__main__":
    main()
