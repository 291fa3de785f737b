"""Case 6: publish + consume throughput, 1 partition on one server vs N on a cluster.

Publishes ``count`` orders in relay-sized batches (500, one pipeline per partition),
then drains them with one worker process's consumers (no-op handler, burst mode).
Both setups run with AOF (everysec) like ``orderflow up``; their servers share the
server core (the cluster's six nodes too), the client keeps its own.
Part of ``python -m bench``; alone: ``python -m bench.case_cluster [--count N]
[--partitions N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import SERVER_CPU, Figure, Stopwatch, can_pin
from orderflow.bus import Delivery, Message, WorkerConfig
from orderflow.bus.connection import connect
from orderflow.bus.consume import PartitionedWorker
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
        with Stopwatch() as publishing:
            for start in range(0, count, BATCH):
                chunk = messages[start : start + BATCH]
                await publisher.publish_keyed(layout, [(m.data["id"], m) for m in chunk])
        config = WorkerConfig(stream=layout.names[0], group="bench", concurrency=64)
        worker = PartitionedWorker(redis, layout, config, _noop)
        with Stopwatch() as consuming:
            stats = await worker.run(burst=True)
        assert stats.acked == count, (stats, count)
        published, consumed = publishing.throughput(count), consuming.throughput(count)
        return {
            "partitions": layout.count,
            "names": " … ".join(dict.fromkeys((layout.names[0], layout.names[-1]))),
            "publish_per_s": round(published.rate),
            "publish_cpu_us": published.cpu_us,
            "consume_per_s": round(consumed.rate),
            "consume_cpu_us": consumed.cpu_us,
        }
    finally:
        await redis.aclose()


@contextlib.contextmanager
def _server_core() -> Iterator[None]:
    """Start children (the servers) on the server core: they inherit this affinity."""
    if not can_pin():
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


async def measure_both(count: int, partitions: int) -> list[dict[str, Any]]:
    """Both setups, one after the other, each on servers started here."""
    from tests.cluster.harness import LocalCluster  # the test harness starts the cluster

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "single", appendfsync="everysec")
        with _server_core():
            server.start()
        try:
            results.append({"setup": "1 server", **await measure(server.url, 1, count)})
        finally:
            server.stop()
        cluster = LocalCluster(Path(tmp) / "cluster")
        with _server_core():
            cluster.start()
        try:
            results.append(
                {"setup": "3-master cluster", **await measure(cluster.url, partitions, count)}
            )
        finally:
            cluster.stop()
    return results


async def run(*, count: int, partitions: int = 6) -> list[Figure]:
    """The figures of case 6: consume rate as the value, publish rate beside it."""
    figures = []
    for row in await measure_both(count, partitions):
        plural = "s" if row["partitions"] > 1 else ""
        figures.append(
            Figure(
                CASE,
                f"{row['setup']}, {row['partitions']} partition{plural}",
                row["consume_per_s"],
                "entries/s",
                note=f"{count:,} entries; stream{plural} {row['names']}",
                extra={
                    "publish entries/s": row["publish_per_s"],
                    "publish client CPU µs/entry": row["publish_cpu_us"],
                    "consume client CPU µs/entry": row["consume_cpu_us"],
                },
            )
        )
    return figures


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()
    for row in asyncio.run(measure_both(args.count, args.partitions)):
        print(row)


if __name__ == "__main__":
    main()
