"""What each fast path of ``orderflow._compat`` is worth: fast against its fallback.

Each fast path is decided once per process (at import), so every measurement runs in a
child process of its own, with ``ORDERFLOW_COMPAT`` unset (fast) or naming the fast
paths to turn off. The modes of one workload run back to back, in an order rotated at
each repeat, and each repeat gives one ratio (fast rate / fallback rate): the machine
is shared, so the report gives the median ratio and the spread over the repeats.

Workloads (children pinned to the client core, servers to the server core):

- ``publish``: ``StreamPublisher.publish_many`` in batches of 100 (redis.stream_io).
- ``consume``: a ``StreamWorker`` draining a preloaded stream, no-op handler, burst
  mode (redis.stream_io).
- ``email``: ``SmtpSender`` (8 connections) sending to the embedded SMTP sink, without
  fsync, in another process (aiosmtplib.pipelining).
- ``cluster``: case 6's publish + consume on a 3-master cluster, 6 partitions
  (redis.cluster_stream_routing).

Run: ``python -m bench --compat [--quick]``; it writes ``COMPAT.md`` and ``compat.json``.

Removed after measuring (a fast path worth under 10% goes): ``prometheus.bulk_observe``,
the worker adding its handler times to the histogram's internals per bucket at each ack
flush instead of ``observe()`` per delivery. Consume, no-op handler: client CPU per entry
1.08x with it off (median of 5; 0.93-1.52), i.e. 0.56 µs per delivery (220 against 780 ns
per value, measured alone) of 7-8.5 µs. In Prometheus multiprocess mode (``orders serve
--workers N``) observe() costs 2.1 µs, but there only the email-status consumer runs, one
entry per email sent (100-200 µs of CPU each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import SERVER_CPU, STREAM, Stopwatch, median, order_message

#: Workload -> the modes measured: "fast" (nothing forced) and ORDERFLOW_COMPAT values.
MODES: dict[str, tuple[str, ...]] = {
    "publish": ("fast", "redis.stream_io"),
    "consume": ("fast", "redis.stream_io", "fallback"),
    "email": ("fast", "aiosmtplib.pipelining"),
    "cluster": ("fast", "redis.cluster_stream_routing"),
}
WORKLOADS = tuple(MODES)
#: Emails in flight at once (the SmtpSender's pool).
EMAIL_CONCURRENCY = 8


@dataclass(frozen=True)
class Sample:
    """One child's measurement: entries (or emails) per second and client CPU per entry."""

    workload: str
    mode: str
    repeat: int
    rate: float
    cpu_us: float


# -- the children --------------------------------------------------------------------------


async def _publish(url: str, count: int) -> dict[str, float]:
    from orderflow.bus.connection import connect
    from orderflow.bus.streams import StreamPublisher

    redis = connect(url)
    try:
        await redis.delete(STREAM)
        messages = [order_message(i) for i in range(count)]
        publisher = StreamPublisher(redis)
        with Stopwatch() as watch:
            for start in range(0, count, 100):
                await publisher.publish_many(STREAM, messages[start : start + 100])
        await redis.delete(STREAM)
    finally:
        await redis.aclose()
    throughput = watch.throughput(count)
    return {"rate": throughput.rate, "cpu_us": throughput.cpu_us}


async def _consume(url: str, count: int) -> dict[str, float]:
    from bench.case_consume import preload
    from orderflow.bus import Delivery, StreamWorker, WorkerConfig
    from orderflow.bus.connection import connect

    redis = connect(url)
    try:
        await preload(redis, count)
        await redis.xgroup_create(STREAM, "compat", id="0")

        async def handler(delivery: Delivery) -> None:
            return None

        worker = StreamWorker(
            redis, WorkerConfig(stream=STREAM, group="compat", consumer="c"), handler
        )
        with Stopwatch() as watch:
            stats = await worker.run(burst=True)
        assert stats.acked == count, (stats, count)
        await redis.delete(STREAM)
    finally:
        await redis.aclose()
    throughput = watch.throughput(count)
    return {"rate": throughput.rate, "cpu_us": throughput.cpu_us}


async def _email(url: str, count: int) -> dict[str, float]:
    from orderflow.email import Renderer, SmtpSender, parse_order

    renderer = Renderer("orderflow <orders@orderflow.localhost>")
    emails = [
        renderer.render(parse_order({"id": i + 1, "email": f"c{i}@example.com", "total": 12}))
        for i in range(count)
    ]
    sender = SmtpSender(url, pool_size=EMAIL_CONCURRENCY)
    try:
        # Connections opened before the clock starts: the steady state is measured.
        await asyncio.gather(*(sender.send(e) for e in emails[:EMAIL_CONCURRENCY]))
        queue = iter(emails)

        async def lane() -> None:
            for email in queue:
                await sender.send(email)

        with Stopwatch() as watch:
            await asyncio.gather(*(lane() for _ in range(EMAIL_CONCURRENCY)))
    finally:
        await sender.close()
    throughput = watch.throughput(count)
    return {"rate": throughput.rate, "cpu_us": throughput.cpu_us}


async def _cluster(url: str, count: int) -> dict[str, float]:
    from bench.case_cluster import measure
    from orderflow.bus.connection import connect

    redis = connect(url)
    try:
        await redis.flushall()
    finally:
        await redis.aclose()
    row = await measure(url, 6, count)
    return {"rate": float(row["consume_per_s"]), "cpu_us": float(row["consume_cpu_us"])}


_CHILDREN = {"publish": _publish, "consume": _consume, "email": _email, "cluster": _cluster}


def _child(workload: str, url: str, count: int) -> None:
    from orderflow import _compat

    result: dict[str, Any] = dict(asyncio.run(_CHILDREN[workload](url, count)))
    result["fast_paths_on"] = sorted(n for n, d in _compat.DECISIONS.items() if d.enabled)
    print(json.dumps(result), flush=True)


async def _sink(directory: str) -> None:
    from orderflow.embedded.redis_server import free_port
    from orderflow.embedded.smtp_sink import SmtpSink

    sink = SmtpSink(Path(directory), port=free_port(), fsync=False)
    await sink.start()
    print(sink.url, flush=True)
    # Until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await sink.stop()


# -- the parent ----------------------------------------------------------------------------


def _run_child(workload: str, mode: str, url: str, count: int) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("ORDERFLOW_COMPAT", None)
    if mode != "fast":
        env["ORDERFLOW_COMPAT"] = mode
    out = subprocess.run(
        [sys.executable, "-m", "bench.case_compat", "child", workload, url, str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    # The mode took: the fast paths it names are off, and only those (or all).
    on = set(result["fast_paths_on"])
    off = {"fallback": None, "fast": set()}.get(mode, {mode})
    assert (not on) if off is None else not (on & off), (mode, on)
    return result


@contextlib.contextmanager
def _on_server_core(pinned: bool) -> Iterator[None]:
    """Children started inside run on the server core (they inherit the affinity).

    ``pinned`` is the run's: by now this process is pinned to the client core, so
    ``can_pin()`` (which wants two cores) no longer tells.
    """
    if not pinned:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def _smtp_sink(directory: Path, pinned: bool) -> Iterator[str]:
    with _on_server_core(pinned):
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.case_compat", "sink", str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(
    url: str, counts: dict[str, int], repeats: int, workloads: tuple[str, ...], pinned: bool
) -> list[Sample]:
    """Every mode of every workload, ``repeats`` times, modes rotated per repeat."""
    samples: list[Sample] = []
    with (
        tempfile.TemporaryDirectory(prefix="orderflow-compat-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        urls = {"publish": url, "consume": url}
        if "email" in workloads:
            urls["email"] = stack.enter_context(_smtp_sink(Path(tmp) / "mail", pinned))
        if "cluster" in workloads:
            from tests.cluster.harness import LocalCluster

            cluster = LocalCluster(Path(tmp) / "cluster")
            with _on_server_core(pinned):
                cluster.start()
            stack.callback(cluster.stop)
            urls["cluster"] = cluster.url
        for repeat in range(repeats):
            for workload in workloads:
                modes = MODES[workload]
                shift = repeat % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    started = time.monotonic()
                    result = _run_child(workload, mode, urls[workload], counts[workload])
                    sample = Sample(workload, mode, repeat, result["rate"], result["cpu_us"])
                    samples.append(sample)
                    print(
                        f"  {workload:8} {mode:30} #{repeat} {sample.rate:>10,.0f}/s "
                        f"{sample.cpu_us:7.1f} µs CPU ({time.monotonic() - started:.0f}s)",
                        flush=True,
                    )
    return samples


@dataclass(frozen=True)
class Worth:
    """One fast path on one workload: fast / fallback, median and spread over repeats."""

    workload: str
    fallback: str
    fast_rate: float
    fallback_rate: float
    rate_ratio: float
    rate_ratio_min: float
    rate_ratio_max: float
    cpu_ratio: float
    cpu_ratio_min: float
    cpu_ratio_max: float


def worth(samples: list[Sample]) -> list[Worth]:
    """The ratios of each workload's fast mode to each of its fallback modes."""
    rows = []
    for workload, modes in MODES.items():
        by = {(s.mode, s.repeat): s for s in samples if s.workload == workload}
        repeats = sorted({r for (_, r) in by})
        for mode in modes[1:]:
            pairs = [(by[("fast", r)], by[(mode, r)]) for r in repeats if (mode, r) in by]
            if not pairs:
                continue
            rate = [f.rate / s.rate for f, s in pairs]
            # CPU per entry: fallback / fast, so above 1 means the fast path saves CPU.
            cpu = [s.cpu_us / f.cpu_us for f, s in pairs]
            rows.append(
                Worth(
                    workload,
                    mode,
                    median([f.rate for f, _ in pairs]),
                    median([s.rate for _, s in pairs]),
                    median(rate),
                    min(rate),
                    max(rate),
                    median(cpu),
                    min(cpu),
                    max(cpu),
                )
            )
    return rows


def report(rows: list[Worth], samples: list[Sample], info: dict[str, Any]) -> str:
    """COMPAT.md: one line per fast path and workload."""
    lines = [
        "# Fast paths against their fallbacks",
        "",
        "Written by `python -m bench --compat` (bench/case_compat.py). "
        f"{info['repeats']} repeats; counts {info['counts']}; load average "
        f"{info['load_before']:.1f} before, {info['load_after']:.1f} after; "
        f"pinned: {info['pinned']}.",
        "Rate ratio: fast rate / fallback rate (median, min-max over the repeats). "
        "CPU ratio: fallback client CPU per entry / fast (above 1: the fast path saves CPU).",
        "",
        "| workload | turned off | fast /s | fallback /s | rate ratio | CPU ratio |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.fallback} | {r.fast_rate:,.0f} | {r.fallback_rate:,.0f} | "
            f"{r.rate_ratio:.2f} ({r.rate_ratio_min:.2f}-{r.rate_ratio_max:.2f}) | "
            f"{r.cpu_ratio:.2f} ({r.cpu_ratio_min:.2f}-{r.cpu_ratio_max:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def run(
    url: str, out: Path, *, quick: bool, pinned: bool, workloads: tuple[str, ...] = WORKLOADS
) -> None:
    """Measure, print the table, and write COMPAT.md and compat.json into ``out``."""
    counts = (
        {"publish": 20_000, "consume": 20_000, "email": 1_000, "cluster": 10_000}
        if quick
        else {"publish": 50_000, "consume": 100_000, "email": 4_000, "cluster": 30_000}
    )
    repeats = 3 if quick else 5
    load_before = os.getloadavg()[0]
    samples = measure(url, counts, repeats, workloads, pinned)
    rows = worth(samples)
    info = {
        "repeats": repeats,
        "counts": {w: counts[w] for w in workloads},
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "pinned": pinned,
    }
    text = report(rows, samples, info)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "COMPAT.md").write_text(text)
    saved = {
        "run": info,
        "worth": [asdict(r) for r in rows],
        "samples": [asdict(s) for s in samples],
    }
    (out / "compat.json").write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "sink":
        asyncio.run(_sink(sys.argv[2]))
    else:
        raise SystemExit(f"usage: python -m bench.case_compat child|sink ...; got {sys.argv[1:]}")
