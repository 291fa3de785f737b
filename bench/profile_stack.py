"""Profile orderflow's processes at saturation with py-spy, and say where their CPU goes.

``e2e``: the ``orderflow up`` stack of bench case 3 (2 email workers), saturated by the
case's load generator; py-spy samples the API process (the relay and the email-status
consumer run in it) and each email worker at once, for ``--seconds`` after a settling
second. ``email-worker``: one ``orderflow email worker`` draining preloaded events into
Postfix's ``smtp-sink``, as bench case 7 runs it. Each profile is a py-spy ``raw`` file
(collapsed stacks, which speedscope and flamegraph.pl open) in ``--out``; ``summary``
prints each one's costs grouped by what they are (see :data:`CATEGORIES`).

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile_stack e2e --seconds 15 --out /tmp/orderflow-profile
    .venv/bin/python -m bench.profile_stack email-worker --seconds 10 --out /tmp/orderflow-profile
    .venv/bin/python -m bench.profile_stack summary /tmp/orderflow-profile/*.txt
    .venv/bin/python -m bench.profile_stack smtp-concurrency --rounds 2

py-spy samples without stopping the process (``--nonblocking``), only while it holds the
GIL (``--gil``): on two shared cores a thread woken from epoll or preempted in a send()
is runnable, not running, and py-spy's default counts it as active (half the samples of
a loaded run). So the shares are of the Python side of the process's CPU; the kernel's
side (socket I/O, fsync) is the ``system`` figure the ``e2e`` and ``email-worker``
commands print from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from bench import case_email_worker as email_case
from bench import case_end_to_end as e2e
from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer

#: Samples per second.
RATE = 200

#: What a frame is, by its file (and function), tried from the stack's leaf up: a sample
#: counts for the first specific match; the generic ones (the event loop, sockets) only
#: when nothing specific is on the stack.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("ledger scripts", re.compile(r"orderflow/email/ledger\.py|redis/commands/core\.py.*Script")),
    (
        "SQLite commit/flush (SQLAlchemy, sqlite3)",
        re.compile(
            r"sqlalchemy/|sqlite3|orderflow/orders/(database|store|outbox|repository|writer|"
            r"email_status_store)\.py"
        ),
    ),
    ("redis-py (commands, parsing)", re.compile(r"/redis/|hiredis|orderflow/_compat/redis")),
    ("SMTP concurrency limit (adaptive)", re.compile(r"orderflow/email/concurrency\.py")),
    ("SMTP client", re.compile(r"aiosmtplib/|orderflow/email/sender\.py|_compat/aiosmtplib")),
    (
        "rendering (templates, MIME)",
        re.compile(
            r"orderflow/email/(render|mime)\.py|orderflow/email/templates/|python3\.\d+/email/|"
            r"jinja2/|markupsafe/"
        ),
    ),
    (
        "HTTP routing, validation (pydantic)",
        re.compile(
            r"starlette/|fastapi/|pydantic|email_validator|orderflow/orders/(api|request_body|"
            r"validation|problems)\.py|orderflow/email/order\.py"
        ),
    ),
    ("uvicorn/h11 (HTTP/1.1)", re.compile(r"uvicorn/|h11/|httptools")),
    ("JSON", re.compile(r"/json/|orjson")),
    ("bus: decode, ack, metrics", re.compile(r"orderflow/bus/")),
    ("Prometheus metrics", re.compile(r"prometheus_client/")),
    ("logging, tracing", re.compile(r"/logging/|orderflow/(logs|tracing)\.py|opentelemetry")),
    ("orderflow: email service", re.compile(r"orderflow/email/")),
    ("orderflow: orders service", re.compile(r"orderflow/orders/")),
]
GENERIC: list[tuple[str, re.Pattern[str]]] = [
    ("asyncio event loop, sockets", re.compile(r"asyncio/|selectors\.py|socket\.py|ssl\.py")),
]
#: Leaves that are no work of the process: a sample there is a thread woken from its wait
#: (epoll, the thread pool's queue) and not yet on a core. py-spy counts a runnable
#: thread as active, and on two busy cores runnable is not running: these are left out.
WAITING = re.compile(
    r"^(EpollSelector\.select|_PollLikeSelector\.select) |^_worker \(.*concurrent/"
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def category(stack: list[str]) -> str:
    """What one sample's CPU went to (``stack`` root first)."""
    for rules in (CATEGORIES, GENERIC):
        for frame in reversed(stack):
            for name, pattern in rules:
                if pattern.search(frame):
                    return name
    return "other"


def read_raw(path: Path) -> list[tuple[list[str], int]]:
    """A py-spy ``raw`` file: (stack, root first, without the thread; count) per line."""
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            frames = stack.split(";")
            samples.append(
                (frames[1:] if frames[0].startswith(("process", "thread")) else frames, int(count))
            )
    return samples


def summarise(path: Path, *, seconds: float | None, top: int = 12) -> str:
    """Markdown: the categories, then the top self and cumulative frames, in % of CPU."""
    everything = read_raw(path)
    samples = [(stack, n) for stack, n in everything if not (stack and WAITING.match(stack[-1]))]
    waiting = sum(n for _, n in everything) - sum(n for _, n in samples)
    total = sum(count for _, count in samples) or 1
    by_category: Counter[str] = Counter()
    self_cost: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    for stack, count in samples:
        by_category[category(stack)] += count
        if stack:
            self_cost[_short(stack[-1])] += count
        for frame in set(map(_short, stack)):
            cumulative[frame] += count
    lines = [f"### {path.stem}", ""]
    if seconds:
        lines.append(
            f"{total:,} samples at work ({total / RATE / seconds * 100:.0f}% of a core's time "
            f"runnable), {waiting:,} woken from a wait and not yet running (left out)."
        )
        lines.append("")
    lines += ["| what | % of the process's CPU |", "| --- | ---: |"]
    lines += [
        f"| {name} | {count / total * 100:.1f} |" for name, count in by_category.most_common()
    ]
    lines += ["", "| top self | % |", "| --- | ---: |"]
    lines += [
        f"| `{frame}` | {count / total * 100:.1f} |" for frame, count in self_cost.most_common(top)
    ]
    lines += ["", "| top cumulative (orderflow's own code) | % |", "| --- | ---: |"]
    own = [(f, c) for f, c in cumulative.most_common() if "orderflow/" in f]
    lines += [f"| `{frame}` | {count / total * 100:.1f} |" for frame, count in own[:top]]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/src/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['function']} ({file})"


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_line(name: str, before: tuple[float, float], after: tuple[float, float], s: float) -> str:
    user, system = ((a - b) / s * 100 for a, b in zip(after, before, strict=True))
    return f"{name}: {user + system:.0f}% of a core (/proc): user {user:.0f}%, system {system:.0f}%"


def py_spy() -> str:
    """The py-spy beside this interpreter, or on PATH."""
    found = Path(sys.executable).with_name("py-spy")
    if found.exists():
        return str(found)
    which = shutil.which("py-spy")
    if which is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return which


def record(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``seconds``, writing a raw file to ``out``."""
    command = [py_spy(), "record", "--pid", str(pid), "--rate", str(RATE), "--duration"]
    command += [str(int(seconds)), "--nonblocking", "--gil", "--full-filenames", "--format"]
    command += ["raw"]
    command += ["-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(recorders: Iterable[subprocess.Popen[bytes]]) -> None:
    for recorder in recorders:
        _, err = recorder.communicate()
        if recorder.returncode:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")


async def profile_e2e(out: Path, seconds: float) -> None:
    """The case 3 stack at saturation, its API and email workers sampled at once."""
    async with e2e._stack(2) as stack:
        await e2e._warm_up(stack)
        pids = e2e._pids(stack)
        generator = e2e._Generator.start(
            stack.api_url, {"mode": "closed", "seconds": seconds + 3, "first_id": 10_000_000}
        )
        await generator.wait_started()
        await asyncio.sleep(1)  # the generator's connections open
        names = ["api", "email-worker-1", "email-worker-2", "mail-sink"]
        cpu0 = {name: cpu_split(pids[name]) for name in names}
        started = time.monotonic()
        recorders = [record(pids[name], out / f"e2e-{name}.txt", seconds) for name in names]
        await asyncio.to_thread(_finish, recorders)
        elapsed = time.monotonic() - started
        for name in names:
            print(_cpu_line(name, cpu0[name], cpu_split(pids[name]), elapsed), flush=True)
        while not generator.done():  # noqa: ASYNC110 (a process's pipe, not an event)
            await asyncio.sleep(0.1)
        result = generator.result()
        print(f"API: {result['ok'] / result['seconds']:,.0f} orders/s", flush=True)


async def profile_email_worker(out: Path, seconds: float) -> None:
    """One ``orderflow email worker`` draining preloaded events into ``smtp-sink``."""
    sink, why = email_case.smtp_sink_path()
    if sink is None:
        raise SystemExit(why)
    count = int(seconds * 3000) + 3000
    with tempfile.TemporaryDirectory(prefix="orderflow-profile-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False, die_with_parent=True)
        server.start()
        redis = connect(server.url)
        try:
            stream, group = "bench:email", "email-service"
            await email_case.preload(redis, stream, group, first_id=10_000_000, count=count)
            async with email_case._smtp_sink(sink, False) as (port, _):
                env = {
                    **os.environ,
                    "ORDERFLOW_REDIS_URL": server.url,
                    "ORDERFLOW_SMTP_URL": f"smtp://127.0.0.1:{port}",
                    "ORDERFLOW_STREAM": stream,
                    "ORDERFLOW_GROUP": group,
                    "ORDERFLOW_EMAIL_EVENTS_STREAM": "bench:email-events",
                    "ORDERFLOW_DATA_DIR": str(Path(tmp) / "data"),
                }
                command = [sys.executable, "-m", "orderflow", "email", "worker"]
                worker = await asyncio.create_subprocess_exec(
                    *command, "--concurrency", "32", env=env, stdout=subprocess.DEVNULL
                )
                try:
                    while await email_case._acked(redis, stream, group) < email_case.WARM:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                    acked0, cpu0 = await email_case._acked(redis, stream, group), time.monotonic()
                    cpu_before = cpu_split(worker.pid)
                    recorder = record(worker.pid, out / "email-worker-smtp-sink.txt", seconds)
                    await asyncio.to_thread(_finish, [recorder])
                    elapsed = time.monotonic() - cpu0
                    acked = await email_case._acked(redis, stream, group) - acked0
                    cpu_after = cpu_split(worker.pid)
                    used = sum(cpu_after) - sum(cpu_before)
                    print(_cpu_line("email worker", cpu_before, cpu_after, elapsed), flush=True)
                    print(
                        f"email worker: {acked / elapsed:,.0f} emails/s, "
                        f"{used / max(acked, 1) * 1e6:,.0f} µs of CPU per email",
                        flush=True,
                    )
                finally:
                    await email_case._stop(worker)
        finally:
            await redis.aclose()
            server.stop()


async def compare_smtp_concurrency(seconds: float, rounds: int) -> None:
    """Case 3's saturation (2 workers) and latency, the email workers' SMTP concurrency
    adaptive then fixed, alternating for ``rounds`` rounds, each on a fresh stack."""
    for _ in range(rounds):
        for mode in ("adaptive", "fixed"):
            os.environ["ORDERFLOW_SMTP_CONCURRENCY"] = mode  # the stack's children inherit it
            saturation, latency = await e2e.run(
                seconds=seconds, latency_seconds=seconds / 2, worker_counts=(2,), peers=()
            )
            x = saturation.extra
            print(
                f"{mode:8} load {os.getloadavg()[0]:.1f}: {saturation.value:,.0f} emails/s, "
                f"API {x[e2e.API_RATE]:,.0f} orders/s, workers "
                f"{x.get(e2e.CPU_PREFIX + 'email-worker-1', 0):.0f}% + "
                f"{x.get(e2e.CPU_PREFIX + 'email-worker-2', 0):.0f}% of a core, sink "
                f"{x.get(e2e.CPU_PREFIX + 'mail-sink', 0):.0f}%; p50 "
                f"{latency.extra['p50']:.1f} ms p99 {latency.extra['p99']:.1f} ms at "
                f"{latency.extra['rate']:,.0f}/s",
                flush=True,
            )
    os.environ.pop("ORDERFLOW_SMTP_CONCURRENCY", None)


def main(argv: list[str] | None = None) -> int:
    """``e2e``, ``email-worker`` or ``summary``."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile_stack")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("e2e", "email-worker"):
        command = commands.add_parser(name)
        command.add_argument("--seconds", type=float, default=15.0)
        command.add_argument("--out", type=Path, required=True)
    compare = commands.add_parser(
        "smtp-concurrency", help="case 3 with adaptive, then fixed SMTP concurrency"
    )
    compare.add_argument("--seconds", type=float, default=8.0)
    compare.add_argument("--rounds", type=int, default=2)
    summary = commands.add_parser("summary")
    summary.add_argument("files", type=Path, nargs="+")
    summary.add_argument("--seconds", type=float, help="the recording's length, for % of a core")
    args = parser.parse_args(argv)
    if args.command == "summary":
        for path in args.files:
            print(summarise(path, seconds=args.seconds))
        return 0
    if args.command == "smtp-concurrency":
        asyncio.run(compare_smtp_concurrency(args.seconds, args.rounds))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    run = profile_e2e if args.command == "e2e" else profile_email_worker
    asyncio.run(run(args.out, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
