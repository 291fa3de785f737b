"""Fixtures of the Email Service tests: a real, programmable aiosmtpd server and helpers."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import SecretStr

from orderflow.bus import Message, StreamPublisher, WorkerStats, decode
from orderflow.config import Settings
from orderflow.email import EmailService, SmtpSender
from orderflow.embedded.smtp_server import SmtpServer

#: Bus timings that keep tests fast: quick retries, short blocking reads.
FAST_WORKER = {"retry_base_ms": 20, "retry_max_ms": 200, "block_ms": 100}
ORDERFLOW = Path(sys.executable).parent / "orderflow"


@dataclass
class Received:
    """One message the test server accepted (250)."""

    mail_from: str
    rcpt_tos: list[str]
    smtp_utf8: bool
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        """The message parsed with the modern email API."""
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class RecordingHandler:
    """An aiosmtpd handler that records accepted messages and can be told to misbehave."""

    received: list[Received] = field(default_factory=list)
    #: Replies for the next DATA commands instead of accepting (e.g. "451 later").
    data_replies: deque[str] = field(default_factory=deque)
    #: A reply to every RCPT instead of accepting it (e.g. "550 no such user").
    rcpt_reply: str | None = None
    #: DATA commands to leave hanging forever (never accepted, never recorded).
    stall_next: int = 0
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    #: Seconds each DATA takes, to widen race windows.
    delay_s: float = 0.0
    data_attempts: int = 0

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept the recipient unless told to refuse."""
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message, or answer as programmed."""
        self.data_attempts += 1
        if self.stall_next > 0:
            self.stall_next -= 1
            self.stalled.set()
            # Cancelled by aiosmtpd when the client goes away.
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow server, the behaviour a test asks for
        if self.data_replies:
            return self.data_replies.popleft()
        self.received.append(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                smtp_utf8=envelope.smtp_utf8,
                raw=envelope.original_content or b"",
            )
        )
        return "250 OK"

    def with_message_id(self, message_id: str) -> list[Received]:
        """The accepted messages with that Message-ID."""
        return [r for r in self.received if r.message["Message-ID"] == message_id]


@dataclass
class SmtpFixture:
    """The test SMTP server and its handler; ``down()``/``up()`` keep the same port."""

    handler: RecordingHandler
    server: SmtpServer

    @property
    def url(self) -> str:
        """Where the server listens."""
        return self.server.url

    async def down(self) -> None:
        """Refuse connections (and drop open ones)."""
        await self.server.stop()

    async def up(self) -> None:
        """Accept connections again, on the same port."""
        await self.server.start()


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpFixture]:
    """A real aiosmtpd server on a free port, SMTPUTF8 enabled."""
    handler = RecordingHandler()
    server = SmtpServer(handler, port=0)
    await server.start()
    yield SmtpFixture(handler, server)
    await server.stop()


@pytest.fixture
def settings(redis_url: str, smtp: SmtpFixture, tmp_path: Path) -> Settings:
    """Settings pointing at the test Redis and SMTP server; quick claims, few deliveries."""
    return Settings(
        redis_url=SecretStr(redis_url),
        smtp_url=SecretStr(smtp.url),
        data_dir=tmp_path,
        claim_idle_ms=1000,
        max_deliveries=4,
    )


ServiceFactory = Callable[..., Awaitable[EmailService]]


@pytest.fixture
async def make_service(
    settings: Settings, aredis: aioredis.Redis, smtp: SmtpFixture
) -> AsyncIterator[ServiceFactory]:
    """Build EmailServices on the test servers (their senders are closed afterwards)."""
    senders: list[SmtpSender] = []

    async def make(
        settings_: Settings | None = None, *, concurrency: int = 8, **worker: Any
    ) -> EmailService:
        current = settings_ or settings
        assert current.smtp_url is not None
        sender = SmtpSender(current.smtp_url.get_secret_value(), pool_size=4)
        senders.append(sender)
        return EmailService(
            current,
            aredis,
            sender,
            concurrency=concurrency,
            worker_options={**FAST_WORKER, **worker},
        )

    yield make
    for sender in senders:
        await sender.close()


async def publish_order(redis: aioredis.Redis, data: dict[str, Any], **headers: str) -> str:
    """XADD an order the way any producer could: ``data`` plus optional ce_* fields."""
    fields: dict[Any, Any] = {"data": orjson.dumps(data), **headers}
    entry_id = await redis.xadd("orders", fields)
    return entry_id.decode()


async def publish_event(redis: aioredis.Redis, data: dict[str, Any]) -> str:
    """Publish an ``order.created`` event through the bus, as the Order Service does."""
    publisher = StreamPublisher(redis)
    return await publisher.publish(
        "orders", Message.event("order.created", data, source="orderflow/orders")
    )


async def email_events(redis: aioredis.Redis) -> list[Message]:
    """Every event on the email-events stream."""
    rows = await redis.xrange("email-events")
    return [decode(cast(dict[bytes, bytes], f), i.decode()) for i, f in rows]


async def dead_letters(redis: aioredis.Redis) -> list[dict[str, str]]:
    """Every entry of the orders dead-letter stream, as text."""
    rows = await redis.xrange("orders:dlq")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


async def pending_count(redis: aioredis.Redis) -> int:
    """Entries delivered to the email-service group and not acknowledged."""
    info = await redis.xpending("orders", "email-service")
    return int(info["pending"])


async def run_burst(service: EmailService, timeout: float = 20.0) -> WorkerStats:
    """Drain the stream with ``service``; on a timeout, say what the worker still held."""
    try:
        return await asyncio.wait_for(service.run(burst=True), timeout)
    except TimeoutError:
        worker = service.worker
        state = {
            name: getattr(worker, name, None)
            for name in ("held", "_inflight", "_retrying", "_queue", "_lanes", "stats")
        }
        raise AssertionError(f"burst run did not finish in {timeout}s: {state}") from None


@pytest.fixture
def processes() -> Iterator[list[asyncio.subprocess.Process]]:
    """Subprocesses a test starts; any still running at the end is killed."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)


async def start_cli(
    processes: list[asyncio.subprocess.Process],
    args: list[str],
    env: dict[str, str],
    log: Path,
) -> asyncio.subprocess.Process:
    """Start ``orderflow ARGS`` (stderr to ``log``); return once it printed a line."""
    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(ORDERFLOW),
            *args,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    processes.append(proc)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    if not line:
        raise AssertionError(f"orderflow {' '.join(args)} exited: {log.read_text()}")
    return proc
