"""The embedded SMTP sink: an aiosmtpd server that delivers every message into a Maildir.

``orderflow up`` runs it when no SMTP server is configured, so confirmation emails
land in ``<data dir>/mail/new`` where a person (or a test) can read them. It runs in
the caller's event loop: nothing is started at import time.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import email
import email.policy
import logging
import mailbox
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Self

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)

#: Where the sink listens unless told otherwise.
DEFAULT_SINK_PORT = 8025
#: File in the data dir where a running sink records its ``smtp://`` URL.
SMTP_URL_FILE = "smtp.url"
#: Largest message accepted (bytes).
DATA_SIZE_LIMIT = 10 * 1024 * 1024


class _TrackedSMTP(SMTP):
    """An aiosmtpd session that leaves its server's set of sessions when it ends."""

    def __init__(self, handler: Any, sessions: set[SMTP], **options: Any) -> None:
        super().__init__(handler, **options)
        self._tracked_in = sessions

    def connection_lost(self, error: Exception | None) -> None:
        self._tracked_in.discard(self)
        super().connection_lost(error)


class SmtpServer:
    """An aiosmtpd server in the running event loop, for any aiosmtpd ``handler``.

    Unlike a bare ``asyncio.Server``, :meth:`stop` also closes open client
    connections, so stopping really makes the server unreachable.
    """

    def __init__(
        self,
        handler: Any,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_SINK_PORT,
        hostname: str = "orderflow.localhost",
        ssl_context: ssl.SSLContext | None = None,
        **smtp_options: Any,
    ) -> None:
        self.handler = handler
        #: TLS from the first byte (``smtps://``); for STARTTLS pass ``tls_context``.
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.hostname = hostname
        self._options: dict[str, Any] = {
            "enable_SMTPUTF8": True,
            "data_size_limit": DATA_SIZE_LIMIT,
            **smtp_options,
        }
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    @property
    def url(self) -> str:
        """The ``smtp://`` URL clients connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "smtps" if self.ssl_context is not None else "smtp"
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while it accepts connections."""
        return self._server is not None

    def _protocol(self) -> SMTP:
        protocol = _TrackedSMTP(
            self.handler,
            self._sessions,
            hostname=self.hostname,
            loop=asyncio.get_running_loop(),
            **self._options,
        )
        self._sessions.add(protocol)
        return protocol

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, then ``port`` is it)."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, ssl=self.ssl_context
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("SMTP server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening and close every open client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _load_syncfs() -> Any:
    """libc's ``syncfs(fd)`` (Linux), or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError, TypeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


class MaildirHandler:
    """An aiosmtpd handler delivering each message into a Maildir, like an MDA does.

    Each message is written to ``tmp/``, flushed to disk (unless ``fsync`` is off),
    renamed into ``new/``, and the rename flushed too, before the server answers 250.
    Messages that arrive while one group is being flushed share the next flush (group
    commit): one ``syncfs`` for the group's files and one ``fsync`` of ``new/`` instead
    of a disk flush per message. The disk work runs in a thread, so the SMTP sessions
    go on meanwhile.
    """

    def __init__(self, maildir: Path, *, fsync: bool = True) -> None:
        self.maildir = Path(maildir)
        self.fsync = fsync
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"
        #: Messages delivered since start.
        self.delivered = 0
        #: Disk flush rounds (groups of messages), for tests and metrics.
        self.flushes = 0
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._syncfs: Callable[[int], int] | None = _load_syncfs() if fsync else None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the message with ``Return-Path`` and ``Delivered-To`` for its envelope."""
        content = envelope.original_content or b""
        trace = f"Return-Path: <{envelope.mail_from or ''}>\r\n"
        trace += "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in envelope.rcpt_tos)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((trace.encode("utf-8") + content, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="orderflow-maildir")
        try:
            # Shielded: a session that goes away must not cancel its group's flush.
            await asyncio.shield(future)
        except OSError as exc:
            # A full or unwritable disk is temporary from the client's point of view;
            # aiosmtpd would answer 500 (permanent) to an exception.
            log.error("cannot deliver into %s: %s", self.maildir, exc)
            return "451 Requested action aborted: local error in processing"
        self.delivered += 1
        return "250 Message accepted for delivery"

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            errors: list[BaseException | None]
            try:
                errors = list(await asyncio.to_thread(self._deliver_group, [d for d, _ in group]))
            except Exception as exc:
                errors = [exc] * len(group)
            except BaseException:
                for _, future in group:
                    future.cancel()
                raise
            self.flushes += 1
            for (_, future), error in zip(group, errors, strict=True):
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _deliver_group(self, messages: list[bytes]) -> list[OSError | None]:
        """Deliver ``messages``; each gets None once durable in ``new/``, or its error."""
        # The Maildir protocol: a unique name, written in tmp/, then renamed into new/,
        # so readers never see a partial message; the data is on disk before the
        # rename, so a crash never leaves a truncated message in new/.
        errors: list[OSError | None] = [None] * len(messages)
        written: list[tuple[int, str]] = []
        for i, data in enumerate(messages):
            name = f"{time.time_ns()}.P{os.getpid()}_{uuid.uuid4().hex}.{self._host}"
            try:
                with open(self.maildir / "tmp" / name, "xb") as file:
                    file.write(data)
                    file.flush()
                    if self.fsync and self._syncfs is None:
                        os.fsync(file.fileno())
            except OSError as exc:
                errors[i] = exc
                continue
            written.append((i, name))
        if not written:
            return errors
        new = self.maildir / "new"
        try:
            if self.fsync and self._syncfs is not None:
                self._sync_filesystem()
            for i, name in written:
                try:
                    os.rename(self.maildir / "tmp" / name, new / name)
                except OSError as exc:
                    errors[i] = exc
            if self.fsync:
                # The renames themselves: new/'s entries are on disk before any 250.
                fd = os.open(new, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            for i, _ in written:
                errors[i] = errors[i] or exc
        return errors

    def _sync_filesystem(self) -> None:
        # One flush of the Maildir's filesystem covers every file of the group.
        assert self._syncfs is not None
        fd = os.open(self.maildir / "tmp", os.O_RDONLY)
        try:
            if self._syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
        finally:
            os.close(fd)


class SmtpSink(SmtpServer):
    """The embedded sink: an SMTP server (SMTPUTF8 on) delivering into ``maildir``."""

    def __init__(
        self,
        maildir: Path,
        host: str = "127.0.0.1",
        port: int = DEFAULT_SINK_PORT,
        *,
        fsync: bool = True,
    ) -> None:
        self.maildir = Path(maildir)
        super().__init__(MaildirHandler(self.maildir, fsync=fsync), host=host, port=port)

    @property
    def delivered(self) -> int:
        """Messages delivered since start."""
        handler: MaildirHandler = self.handler
        return handler.delivered


def iter_maildir(maildir: Path) -> Iterator[EmailMessage]:
    """Every message in the Maildir (new and cur), parsed with the modern email API."""
    if not (Path(maildir) / "new").is_dir():
        return
    box = mailbox.Maildir(maildir, factory=None, create=False)
    for key in box.iterkeys():
        try:
            raw = box.get_bytes(key)
        except KeyError:  # removed by a reader meanwhile
            continue
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        yield message


def read_maildir(maildir: Path, message_id: str | None = None) -> list[EmailMessage]:
    """The delivered messages, or only those with Message-ID ``message_id``."""
    return [
        m
        for m in iter_maildir(maildir)
        if message_id is None or (m.get("Message-ID") or "").strip() == message_id
    ]


def count_delivered(maildir: Path, message_id: str | None = None) -> int:
    """How many messages (with that Message-ID, if given) the Maildir holds."""
    return len(read_maildir(maildir, message_id))
