"""A scenario's system: Redis, the counting SMTP server, the Order Service and workers.

The faults it injects (a worker SIGKILLed, Redis killed and restarted, the SMTP
server stopped) are recorded in its :class:`FaultLog` as they happen, so the
accounting can attribute a duplicate email to the fault that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError

from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer, free_port
from orderflow.embedded.smtp_server import SmtpServer
from tests import support

from .accounting import FaultLog, MailAccount, account_mail
from .load import submit
from .mailcounter import CountingHandler
from .processes import Proc


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """``tests.support.wait_until`` with the patience a scenario with real processes needs."""
    return await support.wait_until(predicate, timeout, interval, what)


@dataclass
class Accounting(MailAccount):
    """The end of a scenario: the mail account, and what is left in Redis and the DB."""

    accepted: int = 0
    emailed: int = 0
    pending: int = 0
    dead_letters: int = 0
    unconfirmed: int = 0
    outbox: int = 0


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
    faults: FaultLog = field(default_factory=FaultLog)

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

    # -- faults, recorded --------------------------------------------------------------

    def kill_worker(self, worker: Proc) -> None:
        """SIGKILL ``worker``, recording the SMTP connections it cut."""
        at, ports = worker.kill_cutting(self.smtp.port)
        self.faults.cut(f"{worker.name} SIGKILLed", at, ports)

    async def kill_redis(self, down_s: float) -> None:
        """SIGKILL Redis, start it again ``down_s`` later (the same data); the outage is
        recorded from the kill until it answers again."""
        killed = time.monotonic()
        self.redis.kill()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.redis.start)
        self.faults.outage("Redis killed", killed, time.monotonic())

    async def stop_smtp(self, down_s: float) -> None:
        """Stop the SMTP server (its open connections cut) for ``down_s``."""
        self.faults.cut("SMTP server stopped", time.monotonic(), self.handler.open_client_ports())
        await self.smtp.stop()
        await asyncio.sleep(down_s)
        await self.smtp.start()

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

    async def submit(self, ids: list[int], **options: Any) -> list[int]:
        """POST each order until accepted (see ``load.submit``); returns the accepted."""
        return await submit(self.api_url, ids, **options)

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

    async def metric(self, name: str) -> float:
        """The sum of the API's Prometheus samples named ``name`` (every label)."""
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"{self.api_url}/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.split("{", 1)[0].split(" ", 1)[0] == name
        )

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
        """Emails per accepted order (duplicates attributed to the recorded faults) and
        what is left behind. A message whose Message-ID cannot be read fails it here."""
        # The workers' send lease is their claim timeout (the shortest, if they differ).
        envs = [worker.env for worker in self.workers] or [self.base_env]
        lease_s = min(int(env["ORDERFLOW_CLAIM_IDLE_MS"]) for env in envs) / 1000
        mail = account_mail(
            accepted, self.handler.mails, self.handler.connections, self.faults, lease_s=lease_s
        )
        assert mail.unparsable == [], f"messages without a readable Message-ID: {mail.unparsable}"
        pending, _ = await self.group_state()
        unconfirmed, outbox = await asyncio.to_thread(self.db_counts)
        wanted = set(accepted)
        return Accounting(
            **vars(mail),
            accepted=len(wanted),
            emailed=sum(1 for i in wanted if mail.by_order[i] > 0),
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


async def make_stack(tmp: Path, *, persistent: bool = True) -> Stack:
    """A started Redis (AOF ``always`` unless not ``persistent``) and counting SMTP server."""
    redis = RedisServer(tmp / "redis", appendonly=persistent, appendfsync="always")
    redis.start()
    handler = CountingHandler()
    smtp = SmtpServer(handler, port=0)
    await smtp.start()
    return Stack(tmp, redis, smtp, handler, stack_env(tmp, redis.url, smtp.url))


def write_duplicate_report(stack: Stack, result: MailAccount, out: Path) -> Path:
    """``out`` (JSON): each duplicate's copies, their connections and the fault each
    copy is attributed to (or why none is)."""
    handler = stack.handler
    rows = []
    for order_id in sorted(result.duplicates):
        copies = []
        for mail in handler.mails:
            if mail.order_id != order_id:
                continue
            connection = handler.connections.get(mail.connection)
            copies.append(
                {
                    "at": round(mail.at, 3),
                    "connection": mail.connection,
                    "client_port": connection.client_port if connection else None,
                    "closed_at": (
                        round(connection.closed_at, 3)
                        if connection and connection.closed_at
                        else None
                    ),
                    "client_quit": connection.quit if connection else None,
                    "messages_after_on_connection": sum(
                        1
                        for m in handler.mails
                        if m.connection == mail.connection and m.at > mail.at
                    ),
                }
            )
        rows.append(
            {
                "order": order_id,
                "excused": result.excused.get(order_id),
                "unexplained": result.unexplained.get(order_id),
                "copies": copies,
            }
        )
    faults = {
        "cuts": [
            {"what": c.what, "at": round(c.at, 3), "ports": sorted(c.client_ports)}
            for c in stack.faults.cuts
        ],
        "outages": [
            {"what": o.what, "start": round(o.start, 3), "end": round(o.end, 3)}
            for o in stack.faults.outages
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"duplicates": rows, "faults": faults}, indent=1))
    return out
