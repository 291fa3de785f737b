"""``python -m bench``: run the cases on a private, pinned redis-server; write RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import (
    case_cluster,
    case_compat,
    case_consume,
    case_email_worker,
    case_end_to_end,
    case_latency,
    case_memory,
    case_publish,
    report,
)
from bench.common import Figure, PinnedRedisServer, can_pin, pin_client
from bench.report import RunInfo

HERE = Path(__file__).resolve().parent
CASES = ("publish", "consume", "end-to-end", "latency", "memory", "cluster", "email-worker")


@dataclass(frozen=True)
class Sizes:
    """How much work each case does: the full run, or a quick smoke run."""

    publish_count: int
    repeats: int
    consume_count: int
    latency_seconds: float
    #: Case 4: rounds the seconds are split into, alternating between the contenders.
    latency_rounds: int
    memory_count: int
    rss_count: int
    #: Case 3: seconds of saturation per worker count, seconds of latency, worker counts.
    e2e_seconds: float
    e2e_latency_seconds: float
    e2e_workers: tuple[int, ...]
    #: Case 6: entries published and consumed per setup.
    cluster_count: int
    #: Case 7: events preloaded per run, seconds measured per run, runs per contender.
    email_count: int
    email_seconds: float
    email_repeats: int


FULL = Sizes(
    publish_count=50_000,
    repeats=3,
    consume_count=100_000,
    latency_seconds=5.0,
    latency_rounds=5,
    memory_count=100_000,
    rss_count=1_000_000,
    e2e_seconds=8.0,
    e2e_latency_seconds=6.0,
    e2e_workers=(2, 1),
    cluster_count=50_000,
    email_count=10_000,
    email_seconds=2.5,
    email_repeats=2,
)
QUICK = Sizes(
    publish_count=10_000,
    repeats=1,
    consume_count=10_000,
    latency_seconds=1.0,
    latency_rounds=1,
    memory_count=10_000,
    rss_count=50_000,
    e2e_seconds=1.5,
    e2e_latency_seconds=1.5,
    e2e_workers=(2,),
    cluster_count=5_000,
    email_count=3_000,
    email_seconds=1.0,
    email_repeats=1,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< 1 minute)")
    parser.add_argument(
        "--only", choices=CASES, action="append", help="run only this case (repeatable)"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="directory for RESULTS.md, the chart and the JSON"
    )
    parser.add_argument(
        "--compat",
        action="store_true",
        help="only measure each fast path of orderflow._compat against its fallback "
        "(writes COMPAT.md and compat.json)",
    )
    parser.add_argument(
        "--compat-workload",
        choices=case_compat.WORKLOADS,
        action="append",
        help="with --compat: only this workload (repeatable)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write RESULTS.md and the chart again from results.json",
    )
    return parser.parse_args(argv)


async def run_cases(url: str, port: int, sizes: Sizes, only: set[str]) -> list[Figure]:
    """Run the selected cases one after another on the same server."""
    runs: dict[str, Callable[[], Awaitable[list[Figure]]]] = {
        "publish": lambda: case_publish.run(
            url, port, count=sizes.publish_count, repeats=sizes.repeats
        ),
        "consume": lambda: case_consume.run(url, count=sizes.consume_count, repeats=sizes.repeats),
        # Case 3 runs its own stack (embedded Redis and all), not on the bench's server.
        "end-to-end": lambda: case_end_to_end.run(
            seconds=sizes.e2e_seconds,
            latency_seconds=sizes.e2e_latency_seconds,
            worker_counts=sizes.e2e_workers,
        ),
        "latency": lambda: case_latency.run(
            url, seconds=sizes.latency_seconds, rounds=sizes.latency_rounds
        ),
        "memory": lambda: case_memory.run(
            url, port, count=sizes.memory_count, rss_count=sizes.rss_count
        ),
        # Case 6 starts its own servers too: one, then a 3-master cluster.
        "cluster": lambda: case_cluster.run(count=sizes.cluster_count),
        # Case 7 runs each worker in a process of its own, against Postfix's smtp-sink.
        "email-worker": lambda: case_email_worker.run(
            url, count=sizes.email_count, seconds=sizes.email_seconds, repeats=sizes.email_repeats
        ),
    }
    figures: list[Figure] = []
    for case in CASES:
        if case in only:
            started = time.monotonic()
            new = await runs[case]()
            _show(new, time.monotonic() - started)
            figures += new
    return figures


def _show(figures: list[Figure], seconds: float) -> None:
    for figure in figures:
        extra = " ".join(f"{k}={v:,.3g}" for k, v in figure.extra.items())
        print(
            f"  {figure.case:8} {figure.contender:40} {figure.value:>12,.1f} {figure.unit} {extra}"
        )
    print(f"  ({seconds:.0f}s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the results; returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        saved = json.loads((args.out / "results.json").read_text())
        figures = [Figure(**figure) for figure in saved["figures"]]
        render(args.out, figures, RunInfo(**saved["run"]))
        return 0
    if args.compat:
        return _compat(args)
    sizes = QUICK if args.quick else FULL
    only = set(args.only or CASES)
    pin = can_pin()
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp:
        server = PinnedRedisServer(Path(tmp) / "redis", pin=pin)
        server.start()
        try:
            pin_client(pin)
            print(f"redis-server pid {server.pid} on {server.url} (pinned: {pin})")
            figures = asyncio.run(run_cases(server.url, server.port, sizes, only))
            server_version = report.redis_version(server.url)
        finally:
            server.stop()
    run = RunInfo(
        quick=args.quick,
        pinned=pin,
        server_version=server_version,
        elapsed_s=time.monotonic() - started,
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {"run": asdict(run), "figures": [asdict(f) for f in figures]}
    (args.out / "results.json").write_text(json.dumps(saved, indent=1) + "\n")
    render(args.out, figures, run)
    return 0


def _compat(args: argparse.Namespace) -> int:
    workloads = tuple(args.compat_workload or case_compat.WORKLOADS)
    pin = can_pin()
    with tempfile.TemporaryDirectory(prefix="orderflow-bench-") as tmp:
        server = PinnedRedisServer(Path(tmp) / "redis", pin=pin)
        server.start()
        try:
            pin_client(pin)
            print(f"redis-server pid {server.pid} on {server.url} (pinned: {pin})")
            case_compat.run(server.url, args.out, quick=args.quick, pinned=pin, workloads=workloads)
        finally:
            server.stop()
    return 0


def render(out: Path, figures: list[Figure], run: RunInfo) -> None:
    """Write RESULTS.md and the chart of one run."""
    report.write(out, figures, run)
    print(f"wrote {out / 'RESULTS.md'} (run took {run.elapsed_s:.0f}s)")


if __name__ == "__main__":
    raise SystemExit(main())
