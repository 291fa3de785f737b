"""Writing ``RESULTS.md`` and the chart from the figures of one run."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import case_email_worker as email_case
from bench.case_end_to_end import (
    CPU_PER_EMAIL,
    CPU_PER_ORDER_PREFIX,
    LATENCY,
    PEER_LATENCY,
    PEER_SATURATION,
    PEERS,
    SATURATION,
    WORKERS,
)
from bench.common import CPU_US, Figure

CHART = "results.png"


def redis_version(url: str) -> str:
    """The version of the server at ``url``."""
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class Target:
    """One target of the issue: a ratio (or a bound) computed from the figures."""

    name: str
    goal: str
    measure: Callable[[Figures], tuple[float, str] | None]
    met: Callable[[float], bool]
    #: What the profile shows is in the way, printed when the target is not met.
    in_the_way: str
    #: Figures of this run that bear on it, added to ``in_the_way``.
    context: Callable[[Figures], str] | None = None


#: Figures by (case, contender).
Figures = dict[tuple[str, str], Figure]


def _value(figures: Figures, case: str, contender: str) -> float | None:
    figure = figures.get((case, contender))
    if figure is None or math.isnan(figure.value):
        return None
    return figure.value


def _ratio(case: str, a: str, b: str) -> Callable[[Figures], tuple[float, str] | None]:
    def measure(figures: Figures) -> tuple[float, str] | None:
        top, bottom = _value(figures, case, a), _value(figures, case, b)
        if top is None or bottom is None or bottom == 0:
            return None
        return top / bottom, f"{top:,.0f} / {bottom:,.0f}"

    return measure


def _versus(figures: Figures, case: str, a: str, b: str) -> str:
    result = _ratio(case, a, b)(figures)
    if result is None:
        return ""
    return f" In this run: {a} is {result[0]:.2f}× {b} ({result[1]} entries/s)."


def _cpu_versus(figures: Figures, case: str, a: str, b: str) -> str:
    ours, theirs = figures.get((case, a)), figures.get((case, b))
    if ours is None or theirs is None or CPU_US not in ours.extra or CPU_US not in theirs.extra:
        return ""
    return (
        f" By client CPU per entry, less disturbed by other processes: {ours.extra[CPU_US]:.1f} "
        f"µs against {theirs.extra[CPU_US]:.1f} µs, a ratio of "
        f"{theirs.extra[CPU_US] / ours.extra[CPU_US]:.2f}×."
    )


def _latency_context(figures: Figures) -> str:
    ours = figures.get(("latency", "orderflow StreamWorker @ 1,000/s"))
    theirs = figures.get(("latency", "minimal redis-py loop @ 1,000/s"))
    if ours is None or theirs is None:
        return ""
    text = (
        f" In this run at 1k/s: p50 {ours.extra['p50']:.2f} ms against the minimal loop's "
        f"{theirs.extra['p50']:.2f} ms, p99 {ours.extra['p99']:.2f} against "
        f"{theirs.extra['p99']:.2f} ms."
    )
    key = "client core late p99"
    if key in ours.extra and key in theirs.extra:
        text += (
            f" Meanwhile the 1 ms sleeper beside them woke {ours.extra[key]:.2f} ms late at "
            f"p99 (during orderflow's run) and {theirs.extra[key]:.2f} ms (during the minimal "
            "loop's): the scheduler alone, no Redis, no work."
        )
    return text


def _latency_p99(figures: Figures) -> tuple[float, str] | None:
    figure = figures.get(("latency", "orderflow StreamWorker @ 1,000/s"))
    if figure is None:
        return None
    baseline = figures.get(("latency", "minimal redis-py loop @ 1,000/s"))
    versus = f"; minimal loop p99 {baseline.value:.2f} ms" if baseline else ""
    return figure.value, f"p99 {figure.value:.2f} ms{versus}"


def _rss_growth(figures: Figures) -> tuple[float, str] | None:
    for (case, name), figure in figures.items():
        if case == "memory" and name.startswith("worker RSS growth"):
            return figure.value, name.removeprefix("worker RSS growth ")
    return None


def _e2e_throughput(figures: Figures) -> tuple[float, str] | None:
    rows = [
        f
        for (case, name), f in figures.items()
        if case == "end to end" and f.unit == "emails/s" and name.startswith("orderflow")
    ]
    if not rows:
        return None
    best = max(rows, key=lambda f: f.value)
    return best.value, f"{best.value:,.0f} emails/s ({best.contender})"


def _e2e_p99(figures: Figures) -> tuple[float, str] | None:
    figure = figures.get(("end to end", LATENCY))
    if figure is None:
        return None
    return figure.value, f"p99 {figure.value:,.0f} ms at {figure.extra['rate']:,.0f} orders/s"


def _peer_rows(figures: Figures, peer: str) -> tuple[Figure, Figure] | None:
    """A peer's saturation row and orderflow's with as many workers as it has consumers."""
    for (case, name), theirs in figures.items():
        if case != "end to end" or WORKERS not in theirs.extra:
            continue
        n = int(theirs.extra[WORKERS])
        if name != PEER_SATURATION.format(peer=PEERS[peer], n=n):
            continue
        ours = figures.get(("end to end", SATURATION.format(n=n, s="" if n == 1 else "s")))
        if ours is not None and not math.isnan(theirs.value) and theirs.value > 0:
            return ours, theirs
    return None


def _e2e_versus(peer: str) -> Callable[[Figures], tuple[float, str] | None]:
    def measure(figures: Figures) -> tuple[float, str] | None:
        rows = _peer_rows(figures, peer)
        if rows is None:
            return None
        ours, theirs = rows
        n = int(theirs.extra[WORKERS])
        return ours.value / theirs.value, (
            f"{ours.value:,.0f} / {theirs.value:,.0f} emails/s, {n} worker/consumer processes each"
        )

    return measure


def _e2e_p99_versus(peer: str) -> Callable[[Figures], tuple[float, str] | None]:
    def measure(figures: Figures) -> tuple[float, str] | None:
        ours = figures.get(("end to end", LATENCY))
        theirs = figures.get(("end to end", PEER_LATENCY.format(peer=PEERS[peer])))
        if ours is None or theirs is None or not theirs.value > 0:
            return None
        return ours.value / theirs.value, (
            f"p99 {ours.value:,.0f} / {theirs.value:,.0f} ms, at {ours.extra['rate']:,.0f} / "
            f"{theirs.extra['rate']:,.0f} orders/s"
        )

    return measure


def _cpu_breakdown(figure: Figure) -> str:
    """A row's CPU per order per process, e.g. 'api 566, email-worker-1 734, ...'."""
    parts = [
        f"{key.removeprefix(CPU_PER_ORDER_PREFIX)} {value:,.0f}"
        for key, value in figure.extra.items()
        if key.startswith(CPU_PER_ORDER_PREFIX)
    ]
    return ", ".join(parts)


def _e2e_cpu_context(peer: str) -> Callable[[Figures], str]:
    def context(figures: Figures) -> str:
        rows = _peer_rows(figures, peer)
        if rows is None or CPU_PER_EMAIL not in rows[0].extra or CPU_PER_EMAIL not in rows[1].extra:
            return ""
        ours, theirs = rows
        return (
            f" In this run, CPU per order over all processes (µs): orderflow "
            f"{ours.extra[CPU_PER_EMAIL]:,.0f} ({_cpu_breakdown(ours)}) against the "
            f"{PEERS[peer]}'s {theirs.extra[CPU_PER_EMAIL]:,.0f} ({_cpu_breakdown(theirs)})."
        )

    return context


def _e2e_latency_context(figures: Figures) -> str:
    ours = figures.get(("end to end", LATENCY))
    theirs = figures.get(("end to end", PEER_LATENCY.format(peer=PEERS["minimal"])))
    if ours is None or theirs is None:
        return ""
    parts = ", ".join(
        f"{part} {ours.extra[part + ' p99']:,.0f} ms"
        for part in ("POST→201", "201→XADD", "XADD→Maildir")
        if part + " p99" in ours.extra
    )
    return (
        f" In this run orderflow's p99 parts: {parts}; the minimal stack's POST→201 p99 "
        f"{theirs.extra['POST→201 p99']:,.0f} ms (it appends before answering)."
    )


def _email_context(figures: Figures) -> str:
    ours = figures.get((email_case.CASE, email_case.ORDERFLOW))
    theirs = figures.get((email_case.CASE, email_case.MINIMAL))
    if ours is None or theirs is None or email_case.CPU_WORKER not in ours.extra:
        return ""
    mine, base = ours.extra[email_case.CPU_WORKER], theirs.extra[email_case.CPU_WORKER]
    return (
        f" In this run: the worker used {mine:,.0f} µs of CPU per email against the minimal "
        f"worker's {base:,.0f} µs (a ratio of {base / mine:.2f}×), at "
        f"{ours.extra[email_case.WORKER_CORE]:.0f}% of a core."
    )


TARGETS = (
    Target(
        "end to end vs FastStream stack (case 3)",
        "≥ 5×",
        _e2e_versus("faststream"),
        lambda r: r >= 5,
        "The FastStream stack runs the same flow with the same number of consumer "
        "processes, 32 emails in flight each. Its CPU per order (below, not profiled "
        "further here) goes to FastAPI and pydantic in the API, and in the consumers to "
        "FastStream's per-message path (one XACK round trip each), the standard library's "
        "EmailMessage and aiosmtplib. Both stacks share two cores with the generator and "
        "other processes: the ratio of CPU per order is the figure those disturb least.",
        _e2e_cpu_context("faststream"),
    ),
    Target(
        "end to end vs minimal stack (case 3)",
        "≥ 0.6×",
        _e2e_versus("minimal"),
        lambda r: r >= 0.6,
        "The minimal stack does none of orderflow's bookkeeping: no outbox (the XADD "
        "happens in the request), no ledger (no claim or mark per email), no email status "
        "back to the API, a plain-text email built with string formatting.",
        _e2e_cpu_context("minimal"),
    ),
    Target(
        "end to end p99 at half saturation vs minimal stack (case 3)",
        "≤ 1.5×",
        _e2e_p99_versus("minimal"),
        lambda r: r <= 1.5,
        "Each stack is measured at half its own saturation rate. orderflow's order waits "
        "for the group commit before its 201, then for the relay to append it (201 → "
        "XADD), then for the worker's claim, send and mark; the minimal stack appends "
        "before answering and sends as soon as XREADGROUP returns.",
        _e2e_latency_context,
    ),
    Target(
        "publish vs minimal loop",
        "≥ 0.9×",
        _ratio("publish", "orderflow publish_many", "minimal redis-py loop"),
        lambda r: r >= 0.9,
        "orderflow packs its pipeline with hiredis (C) and reads the replies under one "
        "deadline; what remains is encoding each Message (orjson, a dict of fields, a size "
        "check), hiredis packing, and redis-py's per-reply read. If this is unmet, look at "
        "the machine's load: the two sides run seconds apart.",
    ),
    Target(
        "consume + ack vs minimal loop",
        "≥ 0.8×",
        _ratio("consume", "orderflow StreamWorker", "minimal redis-py loop"),
        lambda r: r >= 0.8,
        "The minimal loop hands its handler the raw field dict and never parses it; the "
        "worker parses and checks every payload before its handler runs (a malformed entry "
        "is dead-lettered, never handed over). Measured apart (client CPU per entry, the "
        "worker with its decoding stubbed out): the worker's own machinery (raw XREADGROUP "
        "reply, lanes, Delivery, metrics, XACK) costs ~3.2 µs, less than the minimal "
        "loop's ~3.9 µs; decoding adds ~1.6 µs (orjson ~0.8 µs, decode()'s checks and the "
        "Message the rest). The worker keeps its next read in flight while it handles a "
        "batch, which the minimal loop does not, so on an idle server core the rates come "
        "out above the CPU ratio. When this is unmet, look at the load: the two run "
        "seconds apart on a shared machine.",
        lambda figures: (
            _cpu_versus(figures, "consume", "orderflow StreamWorker", "minimal redis-py loop")
            + _versus(
                figures, "consume", "orderflow StreamWorker", "minimal loop + orderflow decode()"
            )
        ),
    ),
    Target(
        "consume + ack vs FastStream per message",
        "≥ 10×",
        _ratio("consume", "orderflow StreamWorker", "FastStream per message"),
        lambda r: r >= 10,
        "FastStream acks each message with its own XACK round trip; its per-message path "
        "(middlewares, dependency injection) is the rest.",
    ),
    Target(
        "end to end orders/s (case 3)",
        "≥ 1,000",
        _e2e_throughput,
        lambda v: v >= 1000,
        "See case 3: emails/s with two and with one email worker, the API's orders/s, and "
        "each process's CPU over the window (the stack shares the machine's two cores with "
        "the generator and with other agents' processes). Where each process's CPU goes at "
        "saturation (py-spy, grouped): bench/PROFILE.md. In the API, SQLite through "
        "SQLAlchemy ~40% (the group-committed insert ~35%, the relay ~13%), HTTP routing "
        "and validation ~18%, uvicorn ~12%: no single cut of 10% left that keeps the "
        "outbox. The email workers sit well under a core: with two of them, the adaptive "
        "SMTP limit, not CPU, sets the rate against the sink that fsyncs each group "
        "(ORDERFLOW_SMTP_CONCURRENCY=fixed sends more; see the README's guarantees).",
    ),
    Target(
        "end to end p99 at half saturation (case 3)",
        "≤ 50 ms",
        _e2e_p99,
        lambda v: v <= 50,
        "See the breakdown under case 3: POST → 201 (the group commit behind SQLite's "
        "write lock), 201 → XADD (the relay) and XADD → Maildir (worker, SMTP, fsync).",
    ),
    Target(
        "XADD → handler p99 at 1k/s",
        "≤ 2 ms",
        _latency_p99,
        lambda v: v <= 2.0,
        "At 1k/s the worker is idle between entries: an entry waits for the blocked "
        "XREADGROUP's wake-up, the reply, and one event-loop turn to its lane (with no "
        "backlog the lane starts before the next read is sent; acks go on their own "
        "connection). At p50 that is within ~0.05 ms of the minimal loop. The p99 is set "
        "by the machine, measured beside each contender in the same run (see the notes of "
        "case 4): a process that only sleeps 1 ms at a time on the client core wakes "
        "milliseconds late at p99, and the generator falls milliseconds behind its schedule "
        "on the server core; other agents' processes run on both cores, and the minimal "
        "loop's p99 moves by as much from run to run. Judge this one on an otherwise idle "
        "machine.",
        _latency_context,
    ),
    Target(
        "email worker vs minimal worker (case 7)",
        "≥ 3×",
        _ratio(email_case.CASE, email_case.ORDERFLOW, email_case.MINIMAL),
        lambda r: r >= 3,
        "Both workers are CPU-bound on the client core when they have it to themselves, "
        "so the rates follow CPU per email, and on a shared machine the share of the core "
        "each got (the worker % column). What the worker's CPU goes to (py-spy, see case "
        "7): rendering ~21% (Jinja ~10%, the order's view ~4%, MIME ~4%), the SMTP "
        "transaction ~14% (pipelined: two writes, two replies), the ledger's batched "
        "scripts ~10%, parsing and validating the order ~8%, the email.sent event ~4%; "
        "the bus's lanes, reads and acks, socket writes (~6%) and asyncio's loop the rest. "
        "The minimal worker's per email is mostly `EmailMessage` (header parsing and "
        "folding, ~60%).",
        _email_context,
    ),
    Target(
        "bytes per retained entry vs raw XADD",
        "≤ 1.1×",
        _ratio("memory", "orderflow wire format v1 (as encoded)", "raw XADD (data only)"),
        lambda r: r <= 1.1,
        "Wire format v1 carries the CloudEvents attributes as separate stream fields. Field "
        "names cost nothing (a stream node stores them once when entries share them), but "
        "each value is stored per entry: see the breakdown below. Meeting 1.1× needs the "
        "event's id, type, source and time gone from the wire; kept on purpose (the wire "
        "format is the contract in DESIGN.md), see below.",
    ),
    Target(
        "worker RSS growth",
        "< 10%",
        _rss_growth,
        lambda v: v < 10,
        "The worker holds no per-entry state after the ack; growth means a leak.",
    ),
)


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit.startswith("ms"):
        return f"{value:,.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


@dataclass(frozen=True)
class RunInfo:
    """How a run went, besides its figures: kept in results.json for ``--render``."""

    quick: bool
    pinned: bool
    server_version: str
    elapsed_s: float
    #: One-minute load averages when the run started and ended.
    load_before: float
    load_after: float
    finished: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    )
    #: The commit measured (``--render`` later must not name the commit it renders at).
    commit: str = field(default_factory=lambda: _commit())


def write(out: Path, figures: list[Figure], run: RunInfo) -> None:
    """Write ``RESULTS.md`` and the chart into ``out``."""
    quick = run.quick
    by_name = {(f.case, f.contender): f for f in figures}
    chart = _chart(out / CHART, figures)
    lines: list[str] = []
    add = lines.append
    add("# orderflow benchmarks")
    add("")
    add(
        f"Generated by `make bench{' QUICK=1' if quick else ''}` "
        f"(`python -m bench{' --quick' if quick else ''}`) on {run.finished}, in "
        f"{run.elapsed_s:.0f} s. "
        "Every figure comes from this one run: each case runs its baselines on the same "
        "private `redis-server`, with the same `order.created` payload (226 bytes of JSON; "
        "orderflow adds its CloudEvents headers)."
    )
    if quick:
        add("")
        add("**Quick run**: small counts, one repetition; use the full run for decisions.")
    add("")
    add("## Machine and versions")
    add("")
    cores = os.cpu_count()
    rows = [
        ("CPU", f"{_cpu_model()}, {cores} cores"),
        ("memory", _memory_gib()),
        ("OS", f"{platform.system()} {platform.release()}"),
        (
            "pinning",
            "redis-server on CPU 0 (`taskset`), clients on CPU 1"
            if run.pinned
            else "none (no `taskset` or fewer than 2 cores)",
        ),
        (
            "load average (1 min)",
            f"{run.load_before:.2f} before, {run.load_after:.2f} after: contenders run one "
            "after another, so other processes skew the ratios too; trust a run on an idle "
            "machine, and the client-CPU columns over the rates",
        ),
        ("redis-server", f"{run.server_version}, no persistence (`appendonly no`, no RDB)"),
        ("Python", platform.python_version()),
        ("event loop", "asyncio (the default, as `orderflow` runs)"),
        ("orderflow", f"{_version('orderflow')} (commit {run.commit})"),
        ("redis-py / hiredis", f"{_version('redis')} / {_version('hiredis')}"),
        ("orjson", _version("orjson")),
        ("FastStream", _version("faststream")),
    ]
    add("| | |")
    add("| --- | --- |")
    for key, text in rows:
        add(f"| {key} | {text} |")
    add("")
    add("## Targets")
    add("")
    add("| target | goal | measured | from | met |")
    add("| --- | --- | --- | --- | --- |")
    unmet: list[Target] = []
    for target in TARGETS:
        result = target.measure(by_name)
        if result is None:
            add(f"| {target.name} | {target.goal} | not measured | | — |")
            continue
        value, source = result
        met = target.met(value)
        if not met:
            unmet.append(target)
        shown = f"{value:.2f}×" if "×" in target.goal else f"{value:.2f}"
        add(
            f"| {target.name} | {target.goal} | {shown} | {source} | {'yes' if met else '**no**'} |"
        )
    add("")
    if unmet:
        add("### What is in the way")
        add("")
        for target in unmet:
            context = target.context(by_name) if target.context else ""
            add(f"- **{target.name}** ({target.goal}): {target.in_the_way}{context}")
        add("")
    add(f"![throughput and latency]({CHART})" if chart else "(chart: matplotlib not installed)")
    add("")
    sections = (
        ("publish", "1. Publish throughput", "batches of 100 entries"),
        ("consume", "2. Consume + ack throughput", "no-op handler, consumer group"),
        ("latency", "4. Latency XADD → handler start", "open loop, warm-up excluded"),
        ("memory", "5. Memory", "Redis `used_memory` delta; worker resident set"),
        (
            "cluster",
            "6. Partitions: one server vs a Redis Cluster",
            "relay-sized batches published, then drained by one worker process (no-op "
            "handler); AOF everysec",
        ),
        (
            email_case.CASE,
            "7. Email worker vs a minimal worker",
            "each drains preloaded `order.created` v2 events in a process of its own (client "
            "core) into Postfix's `smtp-sink` (server core)",
        ),
    )
    for case, title, subtitle in sections:
        rows_of_case = [f for f in figures if f.case == case]
        if case == "latency":
            _end_to_end(add, [f for f in figures if f.case == "end to end"])
        add(f"## {title}")
        add("")
        add(f"_{subtitle}_")
        add("")
        if not rows_of_case:
            add("Not run (`--only`).")
            add("")
            continue
        if case == "cluster":
            add(
                "| setup | consume entries/s | client CPU µs/entry | publish entries/s "
                "| client CPU µs/entry | note |"
            )
            add("| --- | ---: | ---: | ---: | ---: | --- |")
            for f in rows_of_case:
                e = f.extra
                add(
                    f"| {f.contender} | {f.value:,.0f} | {e['consume client CPU µs/entry']:.1f} "
                    f"| {e['publish entries/s']:,.0f} | {e['publish client CPU µs/entry']:.1f} "
                    f"| {f.note} |"
                )
        elif case == email_case.CASE:
            _email_table(add, rows_of_case)
        elif case == "latency":
            add("| contender | p50 ms | p99 ms | p99.9 ms | max ms | note |")
            add("| --- | ---: | ---: | ---: | ---: | --- |")
            for f in rows_of_case:
                e = f.extra
                add(
                    f"| {f.contender} | {e['p50']:.2f} | {e['p99']:.2f} | {e['p99.9']:.2f} "
                    f"| {e['max']:.2f} | {f.note} |"
                )
        else:
            reference = rows_of_case[0].value
            cpu = any(CPU_US in f.extra for f in rows_of_case)
            cpu_header = f" {CPU_US} |" if cpu else ""
            add(f"| contender | value | unit | vs first row |{cpu_header} note |")
            add(f"| --- | ---: | --- | ---: |{' ---: |' if cpu else ''} --- |")
            for f in rows_of_case:
                ratio = f.value / reference if reference and not math.isnan(f.value) else math.nan
                shown_ratio = "" if math.isnan(ratio) or "RSS" in f.contender else f"{ratio:.2f}×"
                cpu_cell = ""
                if cpu:
                    cpu_cell = f" {f.extra[CPU_US]:.1f} |" if CPU_US in f.extra else " |"
                add(
                    f"| {f.contender} | {_fmt(f.value, f.unit)} | {f.unit} | {shown_ratio} |"
                    f"{cpu_cell} {f.note} |"
                )
        add("")
        extra = EXPLANATIONS.get(case)
        if extra:
            add(extra)
            add("")
    (out / "RESULTS.md").write_text("\n".join(lines).rstrip() + "\n")


def _email_table(add: Callable[[str], None], rows: list[Figure]) -> None:
    keys = (email_case.CPU_WORKER, email_case.CPU_SINK, email_case.CPU_REDIS)
    add(
        "| contender | emails/s | vs first row | worker CPU µs/email | smtp-sink CPU µs/email "
        "| redis CPU µs/email | worker % of a core | note |"
    )
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    reference = rows[0].value
    for f in rows:
        ratio = f.value / reference if reference and not math.isnan(f.value) else math.nan
        cells = " | ".join(f"{f.extra[k]:,.0f}" if k in f.extra else "" for k in keys)
        core = f.extra.get(email_case.WORKER_CORE)
        add(
            f"| {f.contender} | {_fmt(f.value, f.unit)} | "
            f"{'' if math.isnan(ratio) else f'{ratio:.2f}×'} | {cells} | "
            f"{'' if core is None else f'{core:.0f}'} | {f.note} |"
        )


def _end_to_end(add: Callable[[str], None], rows: list[Figure]) -> None:
    add("## 3. End to end")
    add("")
    add(
        "_the whole `orderflow up` stack (embedded Redis AOF everysec, API + relay on "
        "SQLite, email workers, SMTP sink with fsync) in a temporary data dir; orders "
        "POSTed by a generator process → emails in the sink's Maildir_"
    )
    add("")
    if not rows:
        add("Not run (`--only`).")
        add("")
        return
    _versus_peers(add, rows)
    saturation = [f for f in rows if f.unit == "emails/s" and not math.isnan(f.value)]
    names = sorted({k for f in saturation for k in f.extra if k.startswith("CPU % ")})
    add("| contender | emails/s (steady) | API orders/s | " + " | ".join(names) + " | note |")
    add("| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " | --- |")
    for f in saturation:
        cells = " | ".join(f"{f.extra[k]:.0f}" if k in f.extra else "" for k in names)
        api = f.extra["API orders/s"]
        add(f"| {f.contender} | {f.value:,.0f} | {api:,.0f} | {cells} | {f.note} |")
    add("")
    add("| order → email | p50 ms | p99 ms | p99.9 ms | max ms | note |")
    add("| --- | ---: | ---: | ---: | ---: | --- |")
    for f in rows:
        if f.unit != "ms":
            continue
        e = f.extra
        add(
            f"| {f.contender} | {e['p50']:.1f} | {e['p99']:.1f} | {e['p99.9']:.1f} "
            f"| {e['max']:.1f} | {f.note} |"
        )
        for part in ("POST→201", "201→XADD", "XADD→Maildir"):
            if f"{part} p50" in e:
                add(
                    f"| … of which {part} | {e[part + ' p50']:.1f} | {e[part + ' p99']:.1f} | | | |"
                )
    add("")
    add(E2E_EXPLANATION)
    add("")
    add(PEERS_EXPLANATION)
    add("")


def _versus_peers(add: Callable[[str], None], rows: list[Figure]) -> None:
    """orderflow against each peer, ratios first: emails/s at saturation with the same
    number of worker (consumer) processes, p99 at half of each one's own saturation, CPU
    per order per process."""
    figures = {(f.case, f.contender): f for f in rows}
    ours_p99 = figures.get(("end to end", LATENCY))
    table: list[str] = []
    for peer, label in PEERS.items():
        pair = _peer_rows(figures, peer)
        if pair is None:
            continue
        ours, theirs = pair
        latency = figures.get(("end to end", PEER_LATENCY.format(peer=label)))
        for row, p99 in ((ours, ours_p99), (theirs, latency)):
            name = row.contender
            if any(line.startswith(f"| {name} |") for line in table):
                continue
            throughput = ours.value / row.value
            p99_ratio = ours_p99.value / p99.value if ours_p99 and p99 and p99.value else math.nan
            p50 = f"{p99.extra['p50']:.1f}" if p99 else ""
            p99_ms = f"{p99.value:.1f}" if p99 else ""
            cpu = row.extra.get(CPU_PER_EMAIL, math.nan)
            cpu_ratio = ours.extra.get(CPU_PER_EMAIL, math.nan) / cpu
            table.append(
                f"| {name} | {throughput:.2f}× | {p99_ratio:.2f}× | {cpu_ratio:.2f}× "
                f"| {row.value:,.0f} | {p50} | {p99_ms} | {cpu:,.0f} | {_cpu_breakdown(row)} |"
            )
    if not table:
        return
    add(
        "| contender | orderflow ÷ it, emails/s | orderflow ÷ it, p99 | orderflow ÷ it, CPU per "
        "order | emails/s | p50 ms | p99 ms | CPU µs per order | … per process (API per order "
        "taken, the rest per email) |"
    )
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for line in table:
        add(line)
    add("")


E2E_EXPLANATION = (
    "**How it is measured.** `bench/case_end_to_end.py` starts the stack with "
    "`orderflow.cli.up.start_stack` (every process free to use both cores), warms it with "
    "100 orders, then a generator in its own process (a minimal asyncio HTTP/1.1 client, "
    "32 keep-alive connections, closed loop) POSTs orders for a fixed time with 2 email "
    "workers, then again with worker 2 paused. 'emails/s' is the growth of the Maildir's "
    "`new/` count after the first 30% of the window; 'API orders/s' the 201s per second. "
    "The CPU columns are each process's user + system time over the window (`/proc`), in "
    "% of one core; 'generator' is the load generator's, small, so the figures are the "
    "stack's. The saturation runs leave a backlog (the API takes orders faster than they "
    "are emailed); it is skipped before the latency run (`XGROUP SETID … $` until the "
    "relay's outbox is empty, then the emails in flight acknowledged; the run stops with a "
    "`BacklogError` if that takes over 30 s), so the run starts on empty groups: open loop "
    "at half the best rate, each order stamped (`time.time_ns()`) right before its "
    "request, its arrival the mtime (ns) of the Maildir file with its "
    "`Message-ID: <order-N@…>`. The breakdown uses the 201's "
    "arrival at the generator and the relay's XADD time (the entry id, ms resolution).\n\n"
    "**What costs CPU per order**, all processes together: the figure in the 'CPU µs per "
    "order' note (about 0.9 ms of CPU per order, so two cores carry ~2,000 orders/s at "
    "best). Per process, measured with `/proc` CPU over 5,000–6,000 orders through the "
    "whole stack at the end of the performance work, then on uvloop (asyncio's loop, used "
    "now, costs about 15% more in each; this run's total is above): API ~300 µs (uvicorn "
    "~30%, the "
    "group-committed insert ~24%, the email-status consumer ~20%), both email workers "
    "~460 µs together (the ledger's Redis scripts ~22%, the SMTP transaction ~18%, "
    "rendering ~9%, parsing the order ~5%), the SMTP sink 140–230 µs (its `syncfs` "
    "moves with other processes' disk writes), Redis ~80 µs, the load generator ~28 µs. "
    "Before that work the same stack cost ~2.1 ms per order (API ~650 µs, workers "
    "~740 µs, sink ~620 µs) and delivered 129–325 emails/s. "
    "**What changed**: `POST /orders` on a lean ASGI path (the FastAPI route kept for the "
    "OpenAPI document, both answering alike), a cheaper address check (the domain by "
    "`email_validator`, cached; the local part by a regular expression, property-tested "
    "against it), the hot SQLite transactions on the event loop's thread, statements "
    "built once; email-status updates batched into one transaction per read batch; the "
    "SMTP client pipelining MAIL/RCPT/DATA when the server offers PIPELINING; the sink's "
    "own SMTP session (PIPELINING, one reply write per batch) with one `syncfs` per "
    "group of messages; the ledger's mark and the `email.sent` event in one script; "
    "`gc.freeze()` of each process's long-lived objects once started (full collections "
    "had been 30–60 ms pauses, most of the p99). uvloop would cut another ~15% but is "
    "not used: it raises `RuntimeError` on writes to a reset connection, which killed "
    "email workers in the network-fault chaos scenario. **Next**, if more is wanted: "
    "claim a whole read batch in the ledger with one script call instead of one per "
    "order, and run several API processes (`orders serve --workers N`) on PostgreSQL.\n"
)


PEERS_EXPLANATION = (
    "**The peers** (`bench/peers/`) run the same flow after orderflow, one at a time, each "
    "started as processes the way `orderflow up` starts orderflow's: their own embedded "
    "Redis (AOF everysec), the same `orderflow mail sink` process (Maildir, fsync), one "
    "API process under uvicorn with orderflow's options (asyncio's loop, no access log) "
    "and as many consumer processes in one consumer group as orderflow has email workers "
    "(the saturation row named with it), each with 32 emails in flight as orderflow's "
    "worker (`--concurrency 32`). The same generator saturates each for the same time; "
    "each one's latency is taken at half its own saturation rate, its backlog skipped the "
    "same way (`XGROUP SETID … $`, in-flight emails acknowledged). A p99 is reported only "
    "from 100 samples or more with every email in. Both peers send on one SMTP pool "
    "(`bench.peers.SmtpPool`, 32 open connections per process). Neither peer has an "
    "outbox or a ledger: an order whose XADD fails after its commit gets no email (the "
    "API answers 503), and an email sent just before a consumer dies is sent again. "
    "The **FastStream stack** is written the way FastStream's documentation teaches: a "
    "FastAPI route (pydantic model, `EmailStr`) that stores the order with sqlite3 and "
    "publishes it with a `RedisBroker` started in the app's lifespan, and a `FastStream` "
    "app per consumer process whose `@broker.subscriber(stream=StreamSub(..., group=..., "
    "consumer=...))` builds an `EmailMessage` and sends it with aiosmtplib; FastStream "
    "acks each message (one XACK each). Each choice left to the user is the one fairer to "
    "it: `max_workers=32` (FastStream's concurrency setting), a pool of 32 open SMTP "
    "connections per process rather than `aiosmtplib.send()`'s new connection per email, "
    "`max_records=100` (without it one XREADGROUP takes the whole backlog and one "
    "consumer starves the other), and no per-message log lines (`logger=None`). The "
    "**minimal stack** is the cheapest correct code: one raw ASGI callable under uvicorn "
    "(the body checked field by field, the address by a strict pattern as it goes into a "
    "header), a sqlite3 insert in autocommit (WAL, `synchronous=NORMAL`, as orderflow's "
    "SQLite), the XADDs of concurrent requests sent in one pipeline before each 201, and "
    "per consumer process a loop of XREADGROUP COUNT 100, the batch's emails sent "
    "concurrently on 32 aiosmtplib connections, one XACK for the sent ones. Both send a "
    "plain-text confirmation (~450 bytes) where orderflow renders a text + HTML one from "
    "its templates. A stack whose worker (consumer) processes use well under a core each at "
    "saturation (the CPU % table) is held by the emails it keeps in flight and the sink's "
    "reply time (one fsync per group of messages), not by CPU: then the ratio of CPU per "
    "order says more than the ratio of rates, and the rates move with the load on the "
    "disk."
)


EXPLANATIONS = {
    email_case.CASE: (
        "`bench/case_email_worker.py`: each contender drains its own stream of real "
        "`order.created` version 2 events (the Order Service's `order_event`, appended by "
        "`StreamPublisher`), started as a process of its own on the client core: "
        "`python -m orderflow email worker --concurrency 32` as the CLI runs it (ledger "
        "claim, render, SMTP, ledger mark + `email.sent` in one script), and the minimal "
        "worker (redis-py XREADGROUP COUNT 100, `json`, a text `EmailMessage`, aiosmtplib "
        "on 32 connections, XACK per batch of sends; no ledger, no events, no validation, "
        "no HTML part: with `add_alternative` as orderflow's two parts, its CPU per email "
        "doubles, so the baseline here is the harder one). Both send to Postfix's "
        "`smtp-sink -u nobody 127.0.0.1:PORT 1000` on the server core (installed from "
        "Debian's `postfix` when missing). After 300 emails (imports, connections) each "
        "is measured for a fixed time: acknowledged entries per second (`XINFO GROUPS`), "
        "and each process's CPU (`/proc`) per email. The contenders alternate run by run; "
        "the figures are medians, every run's rate in the note.\n\n"
        "**Where the worker's CPU went, and what was cut** (py-spy at 250–400 Hz on the "
        "worker draining into `smtp-sink`; CPU per email measured same-run against the "
        "earlier commit, medians of three alternating runs, on a 2-core machine at load "
        "5–8). Before (commit 3f354cd, ~1.1–1.3 ms per email): the ledger's two scripts "
        "per email 28% (redis-py packing and parsing each EVALSHA: mark + `email.sent` "
        "17%, claim 12%), rendering 13%, the SMTP transaction 12%, parsing the order 6%. "
        "Cut: (1) claims, and marks with their `email.sent`, asked in the same event-loop "
        "turn go to Redis in one script call packed by hiredis, each order's transition "
        "run by the same Lua function as before, one after the other (1.31× less CPU per "
        "email); a batch of one the same way (another 1.16×); (2) the templates read a "
        "view of the order made once, and Jinja's unused default globals are no longer "
        "copied into each render's context (1.15×); (3) the SMTP DATA content skips its "
        "two regular expressions when the email needs neither (CRLF already, no leading "
        "dot), and MIME measures line lengths in C (1.19×); (4) lease tokens from a "
        "counter, not a uuid4; (5) the `email.sent` payload built as a dict (pinned to "
        "the model's dump by a test), an amount in its usual shape spared the checks it "
        "passes by its shape, plain view dataclasses, the Date header once per second "
        "(together 1.39×). After (commit 5e1c967): ~0.7–0.85 ms per email; rendering "
        "~21%, SMTP ~14%, ledger batches ~10%, parsing ~8%. Same alternating runs at "
        "load ~8: the starting commit 1.76× the minimal worker's rate (issue 17 measured "
        "1.8×), 5e1c967 3.7× (530 against 144 emails/s; CPU per email 700 against "
        "2,792 µs, 1.98× less than at the start)."
    ),
    "publish": (
        "`redis-benchmark` is the C client pipelining 16 XADDs on 4 connections: what the "
        "server can take, not a Python target. The minimal loop is redis-py's own pipeline "
        "of 100 XADDs (hiredis parses the replies, but redis-py packs every argument in "
        "Python: see the client CPU column). orderflow sends the same pipeline packed by "
        "`hiredis.pack_command` (in C), reading the replies under "
        "one deadline instead of one timer each; its figure includes its default retention "
        "(a trim check every 1000 entries)."
    ),
    "consume": (
        "Each contender drains the same preloaded entries through a fresh consumer group. "
        "orderflow decodes every entry into a `Message` before its handler runs (payload "
        "parsed, every check of wire format v1 made, so a malformed entry is dead-lettered "
        "and never reaches a handler); the minimal loop hands the raw fields to its handler "
        "and never parses them. 'minimal loop + orderflow decode()' is that loop decoding "
        "as orderflow's `decode()` does. FastStream reads the same orders in its own wire "
        "format, with its logger off; per message it acks every entry with its own XACK, so "
        "it runs on fewer entries (its rate is steady well before that).\n\n"
        "**Consume + ack, what it costs** (client CPU per entry, measured apart with the "
        "worker's decoding stubbed out; callgrind's instruction counts agree, ~27,300 per "
        "entry against the minimal loop's ~28,600): the worker's machinery ~3.2 µs against "
        "the minimal loop's ~3.9 µs (pinned as in this run), because the worker "
        "takes XREADGROUP's reply as hiredis parses it (redis-py would build a dict per "
        "entry), packs XACK with hiredis, runs handlers that do not wait in one lane task "
        "per batch, builds `Delivery` and `Message` through their slots and counts its "
        "Prometheus metrics itself, adding them in bulk at each ack flush (a Prometheus "
        "update takes a lock: two per entry cost as much as the rest of the lane). Decoding "
        "~1.6 µs: orjson's parse of the 226-byte payload ~0.8 µs, the checks and the "
        "`Message` the rest; the header dict is built on first use (the checks are not "
        "deferred). `decode()` on redis-py's dict, as the third row does it, costs ~2.5 µs. "
        "In burst mode the worker reads without BLOCK: Redis times a `BLOCK 1` "
        "out on its next cron tick, up to 100 ms late, which used to add a fixed 30–100 ms "
        "to every run."
    ),
    "latency": (
        "A generator process appends entries at a fixed rate whatever the consumer does "
        "(open loop) and stamps each with `time.monotonic_ns()` right before sending it; the "
        "handler takes the clock as it starts. The generator runs on the server's core. "
        "Each contender's seconds are split into rounds that alternate between the two (who "
        "goes first alternates too), each with its own warm-up left out, so that a burst of "
        "load from other processes falls on both rather than on whichever ran at the time. "
        "The machine's own noise is measured beside every contender: how late the generator "
        "fell behind its schedule (server core), and how late a process that does nothing "
        "but sleep 1 ms at a time wakes (client core). When those are milliseconds at p99, "
        "so is every latency figure of that run: another process had the core. The "
        "collector is kept off the earlier cases' objects (`gc.freeze()`), as a worker "
        "process would not hold them."
    ),
    "memory": (
        "Bytes per entry: `used_memory` growth over the same orders, appended with "
        "`redis-cli --pipe`. Field names are free (a stream node stores them once when "
        "entries share them); values are not. The encoder leaves out the attributes that "
        "only restate wire format v1's defaults (`ce_specversion` = `1.0`, `content-type` = "
        "`application/json`). What remains above raw is kept on purpose: `ce_id` (an event "
        "keeps its identity through relay duplicates, so any consumer can deduplicate and "
        "trace it), `ce_type` and `ce_source` (routing for consumers in other languages) "
        "and `ce_time` (the event's own time, not the append time: an outbox entry can be "
        "appended long after the order). Reaching 1.1× would mean dropping all four, which "
        "DESIGN allows ('data' alone is valid) but which we judge not worth ~150 bytes an "
        "entry; the 'data + ce_id' rows show what each costs. The one saving the contract "
        "allows without dropping information: DESIGN lets `ce_type` be left out in stream "
        "`orders` (absent means `order.created`), ~15 bytes an entry (~1.48× instead of "
        "~1.53×), far from 1.1×; not taken, as orderflow's own consumers would then see "
        "events of `orders` without their type.\n\n"
        "Worker RSS: a `StreamWorker` in a child process handles the entries with a no-op "
        "handler, fed one chunk (50,000 entries, each with its own id and payload, packed "
        "by hiredis and sent by `redis-cli --pipe`) ahead; its resident set is read at "
        "start, after the first 10% (warm), after every chunk and at the end; growth is "
        "measured from warm to the end, the figure from start is in the note."
    ),
    "cluster": (
        "Each setup publishes the same orders in relay-sized batches (500, one pipeline "
        "per partition) and drains them with one `PartitionedWorker` (burst mode, no-op "
        "handler). The servers run on the server core, the cluster's six nodes (three "
        "masters, three replicas) included; the client keeps its own. On one 2-core "
        "machine a cluster cannot scale out, so this shows what the cluster path costs the "
        "client: redis-py's cluster client packs and routes each command in Python "
        "(publish) and the worker reads and acks through redis-py's cluster commands "
        "instead of its raw hiredis path (consume), hence the CPU columns. No target in "
        "issue 6; run alone with `python -m bench.case_cluster`."
    ),
}


def _chart(path: Path, figures: list[Figure]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(21, 5))
    for ax, case, title in (
        (axes[0], "publish", "1. publish (entries/s)"),
        (axes[1], "consume", "2. consume + ack (entries/s)"),
    ):
        rows = [f for f in figures if f.case == case and not math.isnan(f.value)]
        if not rows:
            ax.set_axis_off()
            continue
        names = [textwrap.fill(f.contender, 14) for f in rows]
        bars = ax.bar(
            names,
            [f.value for f in rows],
            color=["#d1495b" if f.contender.startswith("orderflow") else "#8d99ae" for f in rows],
        )
        ax.bar_label(bars, labels=[f"{f.value:,.0f}" for f in rows], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=7)
        if case == "consume":
            ax.set_yscale("log")
    latency = [f for f in figures if f.case == "latency"]
    ax = axes[2]
    if not latency:
        ax.set_axis_off()
    width = 0.25
    for k, key in enumerate(("p50", "p99", "p99.9")):
        xs = [i + (k - 1) * width for i in range(len(latency))]
        ax.bar(xs, [f.extra[key] for f in latency], width, label=key)
    if latency:
        ax.set_xticks(range(len(latency)))
        ax.set_xticklabels([textwrap.fill(f.contender, 16) for f in latency], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title("4. XADD → handler start (ms)")
        ax.legend()
    ax = axes[3]
    e2e = [f for f in figures if f.case == "end to end" and f.unit == "emails/s"]
    if not e2e:
        ax.set_axis_off()
    else:
        labels = [textwrap.fill(f.contender.removeprefix("orderflow up, "), 12) for f in e2e]
        positions = list(range(len(e2e)))
        api = [f.extra.get("API orders/s", math.nan) for f in e2e]
        ax.bar([x - 0.2 for x in positions], [f.value for f in e2e], 0.4, label="emails/s")
        ax.bar([x + 0.2 for x in positions], api, 0.4, label="API orders/s")
        ax.axhline(1000, color="#d1495b", linestyle="--", label="target 1,000/s")
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title("3. end to end (orders/s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
