"""The chaos harness: the real processes, a counting SMTP server, load, faults, accounting.

Every scenario runs ``orderflow orders serve`` (API, email-status consumer,
reconciler; the relay in it or as ``orderflow relay``), ``orderflow email worker``
processes, a private ``redis-server`` and an SMTP server in the test's event loop, then
settles and accounts: every order accepted with 201 has exactly one email, none without.

Each scenario records its figures (``reliability`` fixture) as JSON under
``test-artifacts/reliability/``; when chaos scenarios ran, the session's end rewrites
``RELIABILITY.md`` from ``reliability_template.md`` with every recorded scenario.
Sizes: small by default (``make test``), large with ``ORDERFLOW_SOAK=1`` (``make soak``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from aiosmtpd.smtp import SMTP, Envelope, Session
from redis.exceptions import RedisError

from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer, free_port
from orderflow.embedded.smtp_sink import SmtpServer
from tests import support

SOAK = os.environ.get("ORDERFLOW_SOAK", "") == "1"
ORDERFLOW = str(Path(sys.executable).parent / "orderflow")
RESULTS_DIR = Path("test-artifacts") / "reliability"
TEMPLATE = Path(__file__).with_name("reliability_template.md")
MESSAGE_ID = b"Message-ID: <order-"


#: The per-test timeout of a scenario: the soak sizes need far more than the default.
SCENARIO_TIMEOUT = pytest.mark.timeout(1200 if SOAK else 150)


def size(quick: int, soak: int) -> int:
    """A scenario size: ``quick`` in ``make test``, ``soak`` in ``make soak``."""
    return soak if SOAK else quick


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """``tests.support.wait_until`` with the patience a scenario with real processes needs."""
    return await support.wait_until(predicate, timeout, interval)


# -- the SMTP server that counts -------------------------------------------------------


@dataclass
class Mail:
    """One message the server accepted."""

    order_id: int | None
    rcpt_tos: list[str]
    raw: bytes
    at: float
    #: The SMTP connection it came on (numbered in order of first message).
    connection: int = 0


@dataclass
class CountingHandler:
    """Accepts every message and records it, with the order it confirms (by Message-ID)."""

    mails: list[Mail] = field(default_factory=list)
    by_order: Counter[int] = field(default_factory=Counter)
    delay_s: float = 0.0
    #: The server side of each connection that carried mail, by connection number.
    connections: dict[int, SMTP] = field(default_factory=dict)
    #: Connections whose client said QUIT (ended cleanly: it read every reply).
    quit: set[int] = field(default_factory=set)
    _numbers: dict[int, int] = field(default_factory=dict)

    def _connection(self, server: SMTP) -> int:
        number = self._numbers.get(id(server))
        if number is None:
            number = self._numbers[id(server)] = len(self._numbers) + 1
            self.connections[number] = server
        return number

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record and answer 250."""
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        raw = envelope.original_content or b""
        order_id = _order_id(raw)
        mail = Mail(order_id, list(envelope.rcpt_tos), raw, time.monotonic())
        mail.connection = self._connection(server)
        self.mails.append(mail)
        if order_id is not None:
            self.by_order[order_id] += 1
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Note a clean end of the connection."""
        self.quit.add(self._connection(server))
        return "221 Bye"

    def connection_open(self, number: int) -> bool:
        """True while connection ``number`` is still open."""
        transport = self.connections[number].transport
        return transport is not None and not transport.is_closing()

    def after_on_connection(self, mail: Mail) -> int:
        """How many messages came on ``mail``'s connection after it."""
        return sum(1 for m in self.mails if m.connection == mail.connection and m.at > mail.at)

    def cut_before_recorded(self, mail: Mail) -> bool:
        """True if ``mail``'s connection ended without QUIT (its client was killed, or
        the connection dropped) right after it: at most one more message followed, so
        the client may never have read its 250, or died before recording it."""
        return (
            not self.connection_open(mail.connection)
            and mail.connection not in self.quit
            and self.after_on_connection(mail) <= 1
        )

    def first_copy(self, order_id: int) -> Mail:
        """The first message accepted for ``order_id``."""
        return next(m for m in self.mails if m.order_id == order_id)


def _order_id(raw: bytes) -> int | None:
    start = raw.find(MESSAGE_ID)
    if start < 0:
        return None
    start += len(MESSAGE_ID)
    end = raw.find(b"@", start)
    try:
        return int(raw[start:end])
    except ValueError:
        return None


# -- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    """An ``orderflow`` child process, logging to a file; restartable."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Proc:
        """Start (again)."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [ORDERFLOW, *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` if it runs."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def output(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Accounting:
    """The end of a scenario: emails per accepted order, and what is left in Redis."""

    accepted: int
    emailed: int
    lost: list[int]
    duplicates: dict[int, int]
    unexpected: list[int]
    pending: int
    dead_letters: int
    unconfirmed: int
    outbox: int

    @property
    def duplicate_emails(self) -> int:
        """Emails beyond the first, over every order."""
        return sum(n - 1 for n in self.duplicates.values())


@dataclass
class Stack:
    """Redis, an SMTP server, the Order Service and email workers of one scenario."""

    tmp: Path
    redis: RedisServer
    smtp: SmtpServer
    handler: CountingHandler
    base_env: dict[str, str]
    api_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    api: Proc | None = None
    relay: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    client: aioredis.Redis | None = None

    @property
    def db_path(self) -> Path:
        """The Order Service's SQLite file."""
        return self.tmp / "orders.db"

    def env(self, **extra: str) -> dict[str, str]:
        """The processes' environment, with ``extra`` ORDERFLOW_* settings."""
        return {**self.base_env, **{f"ORDERFLOW_{k.upper()}": v for k, v in extra.items()}}

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start ``orderflow ARGS`` as ``name``."""
        proc = Proc(name, args, env or self.env(), self.tmp / f"{name}.log").start()
        self.procs.append(proc)
        return proc

    async def start_api(self, *, relay: bool = True, **extra: str) -> Proc:
        """``orderflow orders serve`` (relay inside unless ``relay`` is False), healthy."""
        args = ["orders", "serve", "--port", str(self.api_port)]
        if not relay:
            args.append("--no-relay")
        self.api = self.spawn("api", args, self.env(**extra))
        await self.wait_healthy()
        return self.api

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until GET /health answers 200."""
        assert self.api is not None
        api = self.api

        async def healthy() -> bool:
            if not api.alive:
                raise AssertionError(f"the API exited:\n{api.output()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    response = await client.get(f"{self.api_url}/health")
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        await wait_until(healthy, timeout, 0.1)

    @property
    def api_url(self) -> str:
        """Where the API listens."""
        return f"http://127.0.0.1:{self.api_port}"

    def start_relay(self) -> Proc:
        """``orderflow relay``."""
        self.relay = self.spawn(f"relay-{len(self.procs)}", ["relay"])
        return self.relay

    def start_worker(self, env: dict[str, str] | None = None, concurrency: int = 16) -> Proc:
        """One more ``orderflow email worker``."""
        name = f"worker-{len(self.workers)}"
        args = ["email", "worker", "--name", name, "--concurrency", str(concurrency)]
        worker = self.spawn(name, args, env)
        self.workers.append(worker)
        return worker

    def restart_worker(self, worker: Proc) -> None:
        """Start a killed worker again, as a supervisor would (same consumer name)."""
        worker.start()

    @property
    def redis_client(self) -> aioredis.Redis:
        """The test's own client on the real Redis (not through any proxy)."""
        if self.client is None:
            self.client = connect(self.redis.url, socket_timeout=5)
        return self.client

    async def forget_client(self) -> None:
        """Drop the test's client (after a Redis restart its pooled connections are dead)."""
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # -- load ------------------------------------------------------------------------

    async def submit(
        self,
        ids: list[int],
        *,
        rate: float | None = None,
        concurrency: int = 4,
        body: Callable[[int], dict[str, Any]] | None = None,
        give_up_s: float = 120.0,
    ) -> list[int]:
        """POST each order (explicit id) until it is accepted with 201, as a client that
        retries with the same id does; at most ``rate`` per second. Returns the accepted.

        Few concurrent clients: on SQLite the API takes more orders per second with 4
        than with 64 (its writers queue for the one database lock).
        """
        make = body or order_body
        queue: asyncio.Queue[int] = asyncio.Queue()
        for order_id in ids:
            queue.put_nowait(order_id)
        accepted: list[int] = []
        started = time.monotonic()
        issued = 0

        async def one(client: httpx.AsyncClient) -> None:
            nonlocal issued
            while not queue.empty():
                order_id = queue.get_nowait()
                if rate is not None:
                    issued += 1
                    await asyncio.sleep(max(0.0, started + issued / rate - time.monotonic()))
                deadline = time.monotonic() + give_up_s
                while True:
                    try:
                        response = await client.post("/orders", json=make(order_id))
                    except httpx.HTTPError:
                        response = None
                    if response is not None and response.status_code == 201:
                        accepted.append(order_id)
                        break
                    if response is not None and response.status_code < 500:
                        raise AssertionError(
                            f"order {order_id}: {response.status_code} {response.text}"
                        )
                    if time.monotonic() > deadline:
                        raise AssertionError(f"order {order_id} never accepted")
                    await asyncio.sleep(0.05)

        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.api_url, timeout=10, limits=limits) as client:
            await asyncio.gather(*(one(client) for _ in range(concurrency)))
        return accepted

    # -- settling and accounting -----------------------------------------------------

    async def group_state(self) -> tuple[int, int]:
        """(pending, lag) of the email-service group; (-1, -1) when Redis is away."""
        try:
            groups = await self.redis_client.xinfo_groups("orders")
        except RedisError:
            return -1, -1
        for group in groups:
            if group["name"] == b"email-service":
                lag = group.get("lag")
                if lag is None:
                    # Redis 6.2 reports no lag (7.0+ none after deletions): count it.
                    after = "(" + group["last-delivered-id"].decode()
                    try:
                        unread = await self.redis_client.xrange("orders", min=after, max="+")
                        lag = len(unread or [])
                    except RedisError:
                        return -1, -1
                return int(group["pending"]), int(lag)
        return -1, -1

    async def dead_letters(self) -> int:
        """Entries in orders:dlq."""
        return int(await self.redis_client.xlen("orders:dlq"))

    def db_counts(self) -> tuple[int, int]:
        """(orders whose email status is not 'sent', outbox rows left)."""
        engine = sa.create_engine(f"sqlite:///{self.db_path}")
        try:
            with engine.connect() as conn:
                unconfirmed = conn.execute(
                    sa.text("SELECT count(*) FROM orders WHERE email_status != 'sent'")
                ).scalar_one()
                outbox = conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar_one()
        finally:
            engine.dispose()
        return int(unconfirmed), int(outbox)

    async def settle(self, accepted: list[int], timeout: float) -> None:
        """Until every accepted order has an email, nothing is pending in the group, the
        outbox is empty and every order is confirmed in the database."""

        async def settled() -> bool:
            if any(self.handler.by_order[i] == 0 for i in accepted):
                return False
            pending, lag = await self.group_state()
            if pending != 0 or lag != 0:
                return False
            unconfirmed, outbox = await asyncio.to_thread(self.db_counts)
            return unconfirmed == 0 and outbox == 0

        try:
            await wait_until(settled, timeout, 0.25)
        except AssertionError:
            missing = [i for i in accepted if self.handler.by_order[i] == 0]
            state = await self.group_state()
            counts = await asyncio.to_thread(self.db_counts)
            raise AssertionError(
                f"not settled in {timeout}s: {len(missing)} orders without email "
                f"(first {missing[:10]}), group (pending, lag) {state}, "
                f"(unconfirmed, outbox) {counts}\n{self.logs_tail()}"
            ) from None

    async def account(self, accepted: list[int]) -> Accounting:
        """Emails per accepted order and what is left behind."""
        wanted = set(accepted)
        counts = self.handler.by_order
        pending, _ = await self.group_state()
        unconfirmed, outbox = await asyncio.to_thread(self.db_counts)
        return Accounting(
            accepted=len(wanted),
            emailed=sum(1 for i in wanted if counts[i] > 0),
            lost=sorted(i for i in wanted if counts[i] == 0),
            duplicates={i: n for i, n in counts.items() if n > 1},
            unexpected=sorted(i for i in counts if i not in wanted),
            pending=pending,
            dead_letters=await self.dead_letters(),
            unconfirmed=unconfirmed,
            outbox=outbox,
        )

    def logs_tail(self, chars: int = 1500) -> str:
        """The end of every process log, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.output()[-chars:]}" for p in self.procs)

    def assert_no_tracebacks(self) -> None:
        """No process logged a traceback (an unexpected error)."""
        for proc in self.procs:
            assert "Traceback" not in proc.output(), f"{proc.name}:\n{proc.output()[-4000:]}"

    async def close(self) -> None:
        """Stop every process and server."""
        for proc in self.procs:
            proc.kill()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        await self.smtp.stop()
        self.redis.stop()


def order_body(order_id: int) -> dict[str, Any]:
    """A valid order with an explicit id."""
    return {
        "id": order_id,
        "email": f"buyer{order_id}@example.com",
        "total": "10.00",
        "items": [{"name": "Book", "quantity": 1}],
    }


def stack_env(tmp: Path, redis_url: str, smtp_url: str) -> dict[str, str]:
    """The base environment of a scenario's processes: short claim times, SQLite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERFLOW_")}
    env.update(
        ORDERFLOW_REDIS_URL=redis_url,
        ORDERFLOW_SMTP_URL=smtp_url,
        ORDERFLOW_DATABASE_URL=f"sqlite:///{tmp / 'orders.db'}",
        ORDERFLOW_DATA_DIR=str(tmp),
        ORDERFLOW_CLAIM_IDLE_MS="2000",
        ORDERFLOW_MAX_DELIVERIES="10",
        # The backoff these scenarios were sized with (about 25–50 s of retries).
        ORDERFLOW_RETRY_BASE_MS="200",
        ORDERFLOW_RECONCILE_AFTER_S="30",
    )
    return env


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Build a scenario's Stack (Redis with AOF ``always`` unless ``persistent=False``)."""
    stacks: list[Stack] = []

    async def make(*, persistent: bool = True) -> Stack:
        tmp = tmp_path / f"stack{len(stacks)}"
        tmp.mkdir()
        redis = RedisServer(tmp / "redis", appendonly=persistent, appendfsync="always")
        redis.start()
        handler = CountingHandler()
        smtp = SmtpServer(handler, port=0)
        await smtp.start()
        stack = Stack(tmp, redis, smtp, handler, stack_env(tmp, redis.url, smtp.url))
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.close()


# -- RELIABILITY.md --------------------------------------------------------------------


@dataclass
class Record:
    """What one scenario promises and what it measured."""

    scenario: str
    must_hold: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so the fixture knows the outcome."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Record]:
    """The scenario's record, written to test-artifacts/reliability/ after the test."""
    record = Record(scenario="", must_hold="")
    started = time.monotonic()
    yield record
    report = getattr(request.node, "report_call", None)
    passed = report is not None and report.passed
    root = Path(str(request.config.rootpath))
    out = root / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "test": request.node.nodeid,
        "scenario": record.scenario or request.node.name,
        "must_hold": record.must_hold,
        "result": "pass" if passed else "FAIL",
        "figures": record.figures,
        "notes": record.notes,
        "mode": "soak" if SOAK else "quick",
        "seconds": round(time.monotonic() - started, 1),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    # One record per scenario and size: the table shows the last quick and soak runs.
    (out / f"{data['mode']}-{name}.json").write_text(json.dumps(data, indent=2))
    request.config.stash[_RAN] = True


_RAN = pytest.StashKey[bool]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Rewrite RELIABILITY.md from the recorded scenarios, when any ran this session."""
    if not session.config.stash.get(_RAN, False):
        return
    root = Path(str(session.config.rootpath))
    records = [json.loads(path.read_text()) for path in sorted((root / RESULTS_DIR).glob("*.json"))]
    (root / "RELIABILITY.md").write_text(render_reliability(records))


def _figures(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())


def render_reliability(records: list[dict[str, Any]]) -> str:
    """RELIABILITY.md: the template with the table of scenarios filled in."""
    records.sort(key=lambda r: (r["test"], r["mode"]))
    rows = [
        "| scenario | what must hold | result | figures | run |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for r in records:
        rows.append(
            f"| {r['scenario']} | {r['must_hold']} | **{r['result']}** | "
            f"{_figures(r['figures'])} | {r['mode']}, {r['seconds']} s, {r['at']} |"
        )
        if r.get("notes"):
            notes.append(f"- **{r['scenario']}**: {r['notes']}")
    template = TEMPLATE.read_text()
    return template.replace("{{table}}", "\n".join(rows)).replace(
        "{{notes}}", "\n".join(notes) or "- (none)"
    )


def chaos_rng(seed: int = 7) -> random.Random:
    """A seeded random source, so a failing run can be replayed."""
    return random.Random(int(os.environ.get("ORDERFLOW_CHAOS_SEED", seed)))


def write_duplicate_report(
    stack: Stack, duplicates: dict[int, int], log: dict[str, list[float]]
) -> Path:
    """``test-artifacts/duplicates/<scenario>.json``: each duplicate's copies, when they
    came relative to the faults in ``log`` and how their SMTP connection ended."""
    handler = stack.handler
    events = sorted((at, kind) for kind, times in log.items() for at in times)
    rows = []
    for order_id in sorted(duplicates):
        copies = []
        for mail in handler.mails:
            if mail.order_id != order_id:
                continue
            before = [(round(mail.at - at, 3), kind) for at, kind in events if at <= mail.at]
            after = [(round(at - mail.at, 3), kind) for at, kind in events if at > mail.at]
            copies.append(
                {
                    "connection": mail.connection,
                    "connection_open": handler.connection_open(mail.connection),
                    "client_quit": mail.connection in handler.quit,
                    "messages_after_on_connection": handler.after_on_connection(mail),
                    "s_since_last_fault": before[-1] if before else None,
                    "s_to_next_fault": after[0] if after else None,
                }
            )
        rows.append({"order": order_id, "copies": copies})
    out = Path("test-artifacts") / "duplicates" / f"{'soak' if SOAK else 'quick'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return out
