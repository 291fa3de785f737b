"""Helpers for the operator command tests: run the CLI in-process, drive real workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from orderflow.bus import Handler, StreamWorker, WorkerConfig, WorkerStats, connect
from orderflow.bus.consume import PartitionedWorker
from orderflow.bus.partitions import PartitionLayout, layout_key
from orderflow.cli import main
from tests.support import clear_orderflow_env


@dataclass(frozen=True)
class CliResult:
    """What one ``orderflow`` command did."""

    code: int
    out: str
    err: str


Cli = Callable[..., CliResult]


def cli_runner(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    """Run ``orderflow ARGS...`` in this process against the Redis at ``url``."""
    clear_orderflow_env(monkeypatch)
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", url)

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture
def cli(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``orderflow ARGS...`` in this process against the test Redis."""
    return cli_runner(redis_url, monkeypatch, capsys)


def add_partitioned_orders(client: Any, layout: PartitionLayout, orders: range) -> dict[int, str]:
    """Record ``layout``'s partition count, as the components do, and add one entry per
    order to its partition. Returns each order's entry id."""
    client.set(layout_key(layout.stream), layout.count)
    ids = {}
    for order in orders:
        data = json.dumps({"id": order, "email": f"o{order}@example.com"})
        ids[order] = client.xadd(layout.for_key(order), {"data": data}).decode()
    return ids


def burst_partitioned(url: str, layout: PartitionLayout, group: str, handler: Any) -> WorkerStats:
    """A real PartitionedWorker of ``group`` over ``layout``, drained in burst mode."""

    async def go() -> WorkerStats:
        client = connect(url)
        try:
            config = WorkerConfig(stream=layout.stream, group=group, block_ms=50)
            return await PartitionedWorker(client, layout, config, handler).run(burst=True)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client (bytes) on the test Redis, to set up and to check what Redis holds."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def run_burst(url: str, stream: str, group: str, handler: Handler, **options: Any) -> WorkerStats:
    """Run a real StreamWorker in burst mode (drain, then return) on its own event loop."""

    async def go() -> WorkerStats:
        client = connect(url)
        try:
            config = WorkerConfig(stream=stream, group=group, block_ms=50, **options)
            return await StreamWorker(client, config, handler).run(burst=True)
        finally:
            await client.aclose()

    return asyncio.run(go())


def entry_ids(rows: Any) -> list[str]:
    """The ids of XRANGE rows, as text."""
    return [row[0].decode() for row in rows]


def state(client: redis.Redis, *streams: str) -> dict[str, Any]:
    """Everything an operator command could change about ``streams`` and their dead letters.

    Idle times are left out: reading them does not change anything.
    """
    snapshot: dict[str, Any] = {}
    for stream in streams:
        for key in (stream, f"{stream}:dlq"):
            if client.type(key) != b"stream":
                snapshot[key] = None
                continue
            groups = []
            for group in client.xinfo_groups(key):
                pending = client.xpending_range(key, group["name"], "-", "+", 10_000)
                groups.append(
                    (
                        group["name"],
                        group["last-delivered-id"],
                        group["pending"],
                        group.get("entries-read"),  # Redis 7.0+ only
                        [(p["message_id"], p["consumer"], p["times_delivered"]) for p in pending],
                    )
                )
            snapshot[key] = {"entries": client.xrange(key), "groups": groups}
    return snapshot
