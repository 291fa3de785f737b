"""Case 3: end to end, orders POSTed to the API → emails accepted by the SMTP sink.

The whole stack runs as ``orderflow up`` runs it (:func:`orderflow.cli.up.start_stack`):
the embedded Redis (AOF everysec), the API with its outbox relay on SQLite, N email
worker processes and the SMTP sink writing a Maildir (250 only once a message and its
rename are on disk: one ``syncfs`` and one ``fsync`` of ``new/`` per group of messages),
in a temporary data dir, every process on asyncio's event loop as the CLI runs them. Every process
may use both cores: the bench's own pinning is lifted while the stack starts, so the
children inherit the whole machine.

1. Saturation, per worker count (2, then 1 with worker 2 paused, on the same stack):
   a load generator in its own process POSTs orders on ``CLIENTS`` keep-alive
   connections as fast as the API answers, for ``seconds``. The API's rate is its 201s
   per second; the end-to-end rate is the growth of the Maildir's ``new/`` count per
   second once steady (the first :data:`SETTLE` of the window left out). Each process's
   CPU over the window (the generator's too) is read from ``/proc``, in % of a core, and
   summed per order (:data:`CPU_PER_EMAIL`, µs: the API's per order taken, the other
   processes' per email delivered): on two shared cores the figure other processes
   disturb least, and the one to cut (1,000 orders/s leaves at most 2 ms of CPU per
   order for every process together).
2. Latency at half the best saturation rate, open loop, on empty groups: the backlog
   the saturation runs left (tens of thousands of orders; minutes of work on a busy
   machine) is skipped, not drained (:mod:`bench.backlog`: ``XGROUP SETID … $`` until the
   relay's outbox is empty, then the emails in flight acknowledged; a
   :class:`~bench.backlog.BacklogError` if that takes longer than :data:`DRAIN_S`). The
   generator POSTs at a fixed rate whatever the stack does, stamping each order's send
   time (``time.time_ns()``); the email's arrival is its Maildir file's mtime (ns),
   matched to the order by its ``Message-ID: <order-{id}@…>``. p50, p99, p99.9, max,
   and a breakdown: POST → 201, 201 → XADD (the entry id's ms), XADD → Maildir; each
   process's CPU per order sent while the generator ran (nothing is batched at this
   rate: several times the saturation run's figure), and the load average before and
   after (the tails move with other work on the machine).

3. The peers (:mod:`bench.peers`), after orderflow, one at a time: the same flow built
   with FastStream as its documentation teaches, and as the cheapest correct code, each
   started as processes (its own Redis, the same sink) with as many consumer processes
   as orderflow's most workers, 32 emails in flight each. Each is saturated as above,
   then measured at half its own saturation rate, its backlog skipped in the same way.

The generator is a small asyncio HTTP/1.1 client (no httpx: httpx's own CPU per request
would be a large part of what we measure on two cores): keep-alive connections, one
write per request. Its CPU is reported, per order too (about 25-30 µs, a few % of a
core at saturation: :data:`GENERATOR_CPU_PER_ORDER`), so the figure is seen to be the
stack's and not the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import math
import multiprocessing
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import orjson

from bench.backlog import Group, skip_backlog
from bench.common import Figure, percentile
from bench.peers import GROUP, STREAM
from bench.peers import stack as peers_stack
from bench.peers.stack import PeerStack
from orderflow.bus import connect
from orderflow.bus.message import DecodeError, decode
from orderflow.cli.up import Stack, start_stack
from orderflow.config import Settings
from orderflow.embedded.redis_server import free_port
from orderflow.supervisor import Child

CASE = "end to end"
#: Keep-alive connections of the saturating generator.
CLIENTS = 32
#: Share of the saturation window left out before the steady rate is taken.
SETTLE = 0.3
#: Fewest latency samples a p99 is reported from.
MIN_P99_SAMPLES = 100
#: Longest wait for the saturation's backlog to be skipped and its in-flight emails out.
DRAIN_S = 30.0
#: Contender names, shared with the report.
SATURATION = "orderflow up, {n} email worker{s}"
LATENCY = "order → email at half saturation"
#: The peers, by the name :mod:`bench.peers.stack` starts them by, with their label.
PEERS = {"minimal": "minimal stack", "faststream": "FastStream stack"}
PEER_NAMES = tuple(PEERS)
PEER_SATURATION = "{peer}, {n} consumer processes"
PEER_LATENCY = "{peer}: order → email at half saturation"
#: ``Figure.extra`` keys.
API_RATE = "API orders/s"
#: Email worker (or consumer) processes.
WORKERS = "workers"
#: One process's CPU per order, in µs, by process name: the API's per order taken,
#: the others' per email delivered.
CPU_PER_ORDER_PREFIX = "CPU µs per order "
CPU_PREFIX = "CPU % "
#: The stack's CPU per order, in µs: the API's per order taken, the rest per email.
CPU_PER_EMAIL = "CPU µs per order"
#: The load generator's CPU per order it sent, in µs.
GENERATOR_CPU_PER_ORDER = "generator CPU µs per order"
#: Latency runs: each process's CPU per order sent, in µs, by process name.
LATENCY_CPU_PREFIX = "CPU µs per order at this rate "
#: Latency runs: the 1-minute load average before and after.
LOAD_BEFORE = "load before"
LOAD_AFTER = "load after"

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<order-(\d+)@", re.MULTILINE | re.IGNORECASE)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Saturation:
    """One saturation run: rates, and each process's share of a core."""

    workers: int
    emails_per_s: float
    api_per_s: float
    errors: int
    #: CPU of each process over the window, in % of one core, by name ("generator" too).
    cpu_pct: dict[str, float]


async def run(
    *,
    seconds: float,
    latency_seconds: float,
    worker_counts: tuple[int, ...] = (2, 1),
    peers: tuple[str, ...] = PEER_NAMES,
) -> list[Figure]:
    """Saturate one stack with each worker count, then measure latency at half the best;
    then each peer, with as many consumer processes as the most workers.

    One stack serves every phase (starting one costs seconds): it starts with the most
    workers, and the extra ones are paused for the smaller counts. The saturation phases
    leave a backlog (the API takes orders faster than they are emailed); it is skipped
    before the latency phase, whose orders are told apart by their ids.
    """
    counts = sorted(set(worker_counts), reverse=True)
    figures: list[Figure] = []
    results: list[Saturation] = []
    async with _stack(counts[0]) as stack:
        await _warm_up(stack)
        for phase, workers in enumerate(counts, start=1):
            for n in range(workers + 1, counts[0] + 1):
                await stack.supervisor.pause(f"email-worker-{n}")
            result = await _saturate(
                stack, _pids(stack), workers, seconds, first_id=phase * 10_000_000
            )
            results.append(result)
            figures.append(_saturation_figure(result))
        best = max(results, key=lambda r: r.emails_per_s)
        await _resume(stack, [f"email-worker-{n}" for n in range(1, best.workers + 1)])
        settings = stack.settings
        groups = [
            Group(settings.stream, settings.group),
            # The API's email-status consumer: its backlog is the emails sent meanwhile.
            Group(settings.email_events_stream, settings.orders_group),
        ]
        await _drain(stack, groups, settled=functools.partial(_outbox_empty, stack))
        rate = max(1.0, best.emails_per_s / 2)
        appended = functools.partial(_appended, stack)
        figures.append(
            await _latency(
                stack, LATENCY, best.workers, rate, latency_seconds, appended, _pids(stack)
            )
        )
    for peer in peers:
        figures += await _peer(peer, counts[0], seconds, latency_seconds)
    return figures


async def _peer(peer: str, consumers: int, seconds: float, latency_seconds: float) -> list[Figure]:
    """A peer's saturation and its latency at half its own saturation rate."""
    label = PEERS[peer]
    name = PEER_SATURATION.format(peer=label, n=consumers)
    if peer == "faststream" and importlib.util.find_spec("faststream") is None:
        note = "FastStream not installed: pip install -e '.[bench]'"
        return [Figure(CASE, name, math.nan, "emails/s", note)]
    async with _peer_stack(peer, consumers) as stack:
        await _warm_up(stack)
        result = await _saturate(stack, stack.pids(), consumers, seconds, first_id=10_000_000)
        figure = _saturation_figure(result, name)
        # The backlog left is skipped, not drained: FastStream's would take minutes.
        await _drain(stack, [Group(STREAM, GROUP)])
        rate = max(1.0, result.emails_per_s / 2)
        title = PEER_LATENCY.format(peer=label)
        latency = await _latency(stack, title, consumers, rate, latency_seconds, None, stack.pids())
    return [figure, latency]


def _saturation_figure(result: Saturation, name: str | None = None) -> Figure:
    n = result.workers
    extra = {API_RATE: result.api_per_s, WORKERS: float(n)}
    extra |= {CPU_PREFIX + name: pct for name, pct in result.cpu_pct.items()}
    if result.emails_per_s > 0 and result.api_per_s > 0:
        # Each process per what it handled: the API takes orders faster than they are
        # emailed at saturation, so its CPU goes per order taken, the rest per email.
        api_s = result.cpu_pct.get("api", 0.0) / 100 / result.api_per_s
        rest = [pct for name, pct in result.cpu_pct.items() if name not in ("api", "generator")]
        extra[CPU_PER_EMAIL] = (api_s + sum(rest) / 100 / result.emails_per_s) * 1e6
        extra[CPU_PER_ORDER_PREFIX + "api"] = api_s * 1e6
        for process, pct in result.cpu_pct.items():
            if process not in ("api", "generator"):
                extra[CPU_PER_ORDER_PREFIX + process] = pct / 100 / result.emails_per_s * 1e6
    if result.api_per_s > 0:
        generator_pct = result.cpu_pct["generator"]
        extra[GENERATOR_CPU_PER_ORDER] = generator_pct / 100 / result.api_per_s * 1e6
    note = f"{result.errors} failed requests" if result.errors else ""
    return Figure(
        CASE,
        name or SATURATION.format(n=n, s="" if n == 1 else "s"),
        result.emails_per_s,
        "emails/s",
        note,
        extra,
    )


@contextlib.asynccontextmanager
async def _stack(workers: int) -> AsyncIterator[Stack]:
    """A fresh ``orderflow up`` stack in a temporary data dir, on every core."""
    with tempfile.TemporaryDirectory(prefix="orderflow-e2e-") as tmp:
        settings = Settings(data_dir=Path(tmp), redis_url=None, database_url=None, smtp_url=None)
        with _all_cores():
            stack = await start_stack(settings, port=free_port(), host="127.0.0.1", workers=workers)
        try:
            yield stack
        finally:
            await stack.stop()


@contextlib.asynccontextmanager
async def _peer_stack(peer: str, consumers: int) -> AsyncIterator[PeerStack]:
    """A fresh peer stack in a temporary data dir, on every core."""
    with tempfile.TemporaryDirectory(prefix=f"orderflow-peer-{peer}-") as tmp:
        with _all_cores():
            stack = await peers_stack.start(peer, Path(tmp), consumers=consumers)
        try:
            yield stack
        finally:
            await stack.stop()


@contextlib.contextmanager
def _all_cores() -> Iterator[None]:
    """Lift this process's pinning while it starts children, which inherit it."""
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


async def _resume(stack: Stack, names: list[str], within_s: float = 60.0) -> None:
    """Start the paused workers among ``names`` again; return once each one reads the
    stream (its log's "consuming" line), so the latency run has every worker."""
    paused = [c for c in stack.supervisor.children if c.name in names and c.paused]

    def started(child: Child) -> int:
        try:
            return child.log_path.read_bytes().count(b" consuming '")
        except FileNotFoundError:
            return 0

    before = {child.name: started(child) for child in paused}
    for child in paused:
        await stack.supervisor.resume(child.name)
    deadline = time.monotonic() + within_s
    while waiting := [c.name for c in paused if started(c) <= before[c.name]]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(waiting)} did not start consuming in {within_s} s")
        await asyncio.sleep(0.05)


def _pids(stack: Stack) -> dict[str, int]:
    pids = {
        child.name: child.pid
        for child in stack.supervisor.children
        if child.pid is not None and not child.paused
    }
    if stack.redis_server is not None and stack.redis_server.pid:
        pids["redis"] = stack.redis_server.pid
    return pids


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class _Running(Protocol):
    """What the phases need of a running stack, orderflow's or a peer's."""

    @property
    def api_url(self) -> str: ...

    @property
    def mail_dir(self) -> Path: ...

    @property
    def redis_url(self) -> str: ...


def _mail_count(stack: _Running) -> int:
    try:
        return sum(1 for _ in os.scandir(stack.mail_dir / "new"))
    except FileNotFoundError:
        return 0


async def _saturate(
    stack: _Running, pids: dict[str, int], workers: int, seconds: float, *, first_id: int
) -> Saturation:
    generator = _Generator.start(
        stack.api_url, {"mode": "closed", "seconds": seconds, "first_id": first_id}
    )
    await generator.wait_started()
    started = time.monotonic()
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    samples: list[tuple[float, int]] = [(0.0, _mail_count(stack))]
    while not generator.done():
        await asyncio.sleep(0.25)
        samples.append((time.monotonic() - started, _mail_count(stack)))
    cpu_after = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    result = generator.result()
    window = samples[-1][0]
    steady = [s for s in samples if s[0] >= SETTLE * window]
    (t0, c0), (t1, c1) = steady[0], steady[-1]
    cpu_pct = {name: (cpu_after[name] - cpu_before[name]) / window * 100 for name in sorted(pids)}
    cpu_pct["generator"] = result["cpu"] / result["seconds"] * 100
    return Saturation(
        workers,
        (c1 - c0) / (t1 - t0) if t1 > t0 else float("nan"),
        result["ok"] / result["seconds"],
        result["errors"],
        cpu_pct,
    )


async def _warm_up(stack: _Running, count: int = 100) -> None:
    """A few orders through every process, so imports and connections are done."""
    before = _mail_count(stack)
    generator = _Generator.start(
        stack.api_url, {"mode": "closed", "count": count, "first_id": 900_000_000}
    )
    while not generator.done():  # noqa: ASYNC110 (a process's pipe, not an event)
        await asyncio.sleep(0.05)
    generator.result()
    deadline = time.monotonic() + 20
    while _mail_count(stack) < before + count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _drain(
    stack: _Running,
    groups: Sequence[Group],
    *,
    settled: Callable[[], Awaitable[bool]] | None = None,
    within_s: float = DRAIN_S,
) -> None:
    """Skip the backlog the saturation runs left and wait for what is in flight: the
    latency run starts on empty groups (:mod:`bench.backlog`; BacklogError if not)."""
    await skip_backlog(stack.redis_url, groups, within_s=within_s, settled=settled)


async def _outbox_empty(stack: Stack) -> bool:
    """True once the relay has published every outbox row (SQLite, as the case runs it)."""
    path = stack.settings.data_dir / "orders.db"

    def count() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    return await asyncio.to_thread(count) == 0


async def _latency(
    stack: _Running,
    name: str,
    workers: int,
    rate: float,
    seconds: float,
    appended_by: Callable[[set[int]], Awaitable[dict[int, int]]] | None,
    pids: dict[str, int] | None = None,
) -> Figure:
    before = {entry.name for entry in os.scandir(stack.mail_dir / "new")}
    load_before = os.getloadavg()[0]
    generator = _Generator.start(
        stack.api_url, {"mode": "open", "rate": rate, "seconds": seconds, "first_id": 1}
    )
    await generator.wait_started()
    cpu_before = {name: _cpu_seconds(pid) for name, pid in (pids or {}).items()}
    while not generator.done():  # noqa: ASYNC110 (a process's pipe, not an event)
        await asyncio.sleep(0.1)
    cpu_used = {name: _cpu_seconds(pid) - cpu_before[name] for name, pid in (pids or {}).items()}
    result = generator.result()
    sent = {order_id: (sent_ns, answered_ns) for order_id, sent_ns, answered_ns in result["sent"]}
    deadline = time.monotonic() + 15
    while _mail_count(stack) - len(before) < len(sent) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    arrivals = _arrivals(stack.mail_dir / "new", before)
    # Where the relay's XADD sits (orderflow); the peers XADD before answering 201.
    appended = await appended_by(set(sent)) if appended_by is not None else {}
    # Leave out the first half second: the generator opening its connections.
    skip = int(rate / 2)
    measured = [(k, sent[k]) for k in sorted(sent)[skip:] if k in arrivals]
    latencies = [(arrivals[k] - sent_ns) / 1e6 for k, (sent_ns, _) in measured]
    # Where the time goes: POST → 201, 201 → XADD (the relay), XADD → Maildir (ms stamps).
    answered = [(answered_ns - sent_ns) / 1e6 for _, (sent_ns, answered_ns) in measured]
    relayed = [(appended[k] - a) / 1e6 for k, (_, a) in measured if k in appended]
    emailed = [(arrivals[k] - appended[k]) / 1e6 for k, _ in measured if k in appended]
    missing = sum(1 for order_id in sent if order_id not in arrivals)
    extra = {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "p99.9": percentile(latencies, 99.9),
        "max": max(latencies, default=float("nan")),
        "POST→201 p50": percentile(answered, 50),
        "POST→201 p99": percentile(answered, 99),
        "201→XADD p50": percentile(relayed, 50),
        "201→XADD p99": percentile(relayed, 99),
        "XADD→Maildir p50": percentile(emailed, 50),
        "XADD→Maildir p99": percentile(emailed, 99),
        "rate": rate,
        "workers": float(workers),
        CPU_PREFIX + "generator": result["cpu"] / result["seconds"] * 100,
        "late ms": result["late_ms"],
        # The machine's load around the run: latency tails move with it (other work).
        LOAD_BEFORE: load_before,
        LOAD_AFTER: os.getloadavg()[0],
    }
    # Each process's CPU per order sent, while the generator ran (µs): at half saturation
    # nothing is batched, so these are not the saturation run's figures.
    if result["sent"]:
        for process, seconds_used in cpu_used.items():
            extra[LATENCY_CPU_PREFIX + process] = seconds_used / len(result["sent"]) * 1e6
    note = (
        f"{rate:,.0f} orders/s for {seconds:.0f} s, {workers} worker(s), {len(latencies):,} "
        f"samples; generator at most {result['late_ms']:.1f} ms late"
    )
    if missing or result["errors"]:
        note += f"; {missing} emails missing, {result['errors']} failed requests"
    if not appended:
        for part in ("201→XADD", "XADD→Maildir"):
            del extra[part + " p50"], extra[part + " p99"]
    # A p99 of fewer samples is their maximum; one of the emails that arrived, with some
    # of the run's missing, leaves out the tail it is meant to show.
    late = sum(1 for k in sorted(sent)[skip:] if k not in arrivals)
    if late or len(latencies) < MIN_P99_SAMPLES:
        extra["p99"] = extra["p99.9"] = math.nan
        note += f"; p99 not measured ({len(latencies)} samples, {late} emails not in)"
    return Figure(CASE, name, extra["p99"], "ms", note, extra)


async def _appended(stack: Stack, order_ids: set[int]) -> dict[int, int]:
    """Order id → when the relay appended its event (the entry id's ms, as ns)."""
    client = connect(stack.redis_url)
    appended: dict[int, int] = {}
    try:
        streams = [
            key
            async for key in client.scan_iter(match=f"{stack.settings.stream}*", _type="stream")
            if not key.endswith(b":dlq")
        ]
        for stream in streams:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(stream)  # type: ignore[assignment]
            for raw_id, fields in entries:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                try:
                    order_id = decode(fields, entry_id).data.get("id")
                except DecodeError:
                    continue
                if order_id in order_ids:
                    appended[order_id] = int(entry_id.split("-")[0]) * 1_000_000
    finally:
        await client.aclose()
    return appended


def _arrivals(new: Path, before: set[str]) -> dict[int, int]:
    """Order id → its email's mtime (ns), for every message not in ``before``."""
    arrivals: dict[int, int] = {}
    for entry in os.scandir(new):
        if entry.name in before:
            continue
        with open(entry.path, "rb") as file:
            head = file.read(4096)
        match = _MESSAGE_ID.search(head)
        if match:
            arrivals[int(match.group(1))] = entry.stat().st_mtime_ns
    return arrivals


# --- the load generator, in its own process ---------------------------------------------


class _Generator:
    """A load generator process; ``result()`` once ``done()``."""

    def __init__(self, process: multiprocessing.process.BaseProcess, pipe: Connection) -> None:
        self.process = process
        self.pipe = pipe
        self._result: dict[str, Any] | None = None
        self._started = False

    @classmethod
    def start(cls, url: str, job: dict[str, Any]) -> _Generator:
        """Spawn the generator on ``url`` with ``job``."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_generator_main, args=(url, job, child), daemon=True)
        # Not pinned: the generator shares both cores with the stack, as a client would.
        with _all_cores():
            process.start()
        child.close()
        return cls(process, parent)

    async def wait_started(self) -> None:
        """Wait for the generator's 'started' word (its imports done)."""
        while not self._started:
            if self.pipe.poll():
                message = self.pipe.recv()
                assert message == "started", message
                self._started = True
            else:
                await asyncio.sleep(0.01)

    def done(self) -> bool:
        """True once the generator sent its result."""
        if self._result is None and self.pipe.poll():
            message = self.pipe.recv()
            if message == "started":
                self._started = True
                return self.done()
            self._result = message
        if self._result is None and not self.process.is_alive() and not self.pipe.poll():
            raise RuntimeError(f"the load generator died (exit {self.process.exitcode})")
        return self._result is not None

    def result(self) -> dict[str, Any]:
        """The generator's counts; joins the process."""
        assert self._result is not None
        self.process.join(5)
        return self._result


def _generator_main(url: str, job: dict[str, Any], pipe: Connection) -> None:
    pipe.send("started")
    result = asyncio.run(_generate(url, job))
    pipe.send(result)
    pipe.close()


def _order_body(order_id: int) -> bytes:
    return orjson.dumps(
        {
            "id": order_id,
            "email": f"customer{order_id:07d}@example.com",
            "total": "123.45",
            "currency": "USD",
            "items": [
                {"name": "Widget", "quantity": 2, "price": "49.90"},
                {"name": "Gadget", "quantity": 1, "price": "23.65"},
            ],
        }
    )


class _Connection:
    """One keep-alive HTTP/1.1 connection: POST /orders, read the status and body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection unless open."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post_order(self, order_id: int) -> bool:
        """POST one order; True on 201."""
        await self.connect()
        assert self.reader is not None
        assert self.writer is not None
        body = _order_body(order_id)
        self.writer.write(
            b"POST /orders HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (self.host.encode(), self.port, len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status == 201

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _generate(url: str, job: dict[str, Any]) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if job["mode"] == "open":
        result = await _open_loop(host, int(port), job["rate"], job["seconds"], job["first_id"])
    else:
        result = await _closed_loop(host, int(port), job)
    result["cpu"] = time.process_time() - cpu0
    result["seconds"] = time.perf_counter() - wall0
    return result


async def _closed_loop(host: str, port: int, job: dict[str, Any]) -> dict[str, Any]:
    """``CLIENTS`` connections, each POSTing as soon as its previous answer is in."""
    counts = {"ok": 0, "errors": 0}
    next_id = job.get("first_id", 1)
    limit = job.get("count")
    deadline = time.perf_counter() + job.get("seconds", 1e9)

    async def client() -> None:
        nonlocal next_id
        connection = _Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                if limit is not None and next_id - job.get("first_id", 1) >= limit:
                    return
                order_id, next_id = next_id, next_id + 1
                try:
                    ok = await connection.post_order(order_id)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    ok = False
                    await connection.close()
                    connection = _Connection(host, port)
                counts["ok" if ok else "errors"] += 1
        finally:
            await connection.close()

    clients = min(CLIENTS, limit) if limit is not None else CLIENTS
    await asyncio.gather(*(client() for _ in range(clients)))
    return dict(counts)


async def _open_loop(
    host: str, port: int, rate: float, seconds: float, first_id: int
) -> dict[str, Any]:
    """POST at ``rate`` orders/s on a pool of connections, whatever the answers take."""
    idle: list[_Connection] = []
    #: (order id, sent, answered), wall clock ns.
    sent: list[tuple[int, int, int]] = []
    errors = 0
    late_ns = 0
    tasks: set[asyncio.Task[None]] = set()

    async def post(order_id: int) -> None:
        nonlocal errors
        connection = idle.pop() if idle else _Connection(host, port)
        try:
            await connection.connect()
            sent_ns = time.time_ns()
            ok = await connection.post_order(order_id)
            sent.append((order_id, sent_ns, time.time_ns()))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            ok = False
            await connection.close()
            connection = _Connection(host, port)
        errors += not ok
        idle.append(connection)

    total = int(rate * seconds)
    start = time.perf_counter_ns()
    interval_ns = 1e9 / rate
    k = 0
    while k < total:
        now = time.perf_counter_ns()
        due = min(total, int((now - start) / interval_ns) + 1)
        while k < due:
            late_ns = max(late_ns, now - start - int(k * interval_ns))
            task = asyncio.create_task(post(first_id + k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        wait_ns = start + k * interval_ns - time.perf_counter_ns()
        await asyncio.sleep(max(0.0, wait_ns / 1e9))
    if tasks:
        await asyncio.gather(*tasks)
    for connection in idle:
        await connection.close()
    return {"sent": sent, "ok": len(sent) - errors, "errors": errors, "late_ms": late_ns / 1e6}
