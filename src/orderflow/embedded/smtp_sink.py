"""The embedded SMTP sink, delivering every message into a Maildir, and a general
aiosmtpd server for tests.

``orderflow up`` runs the sink when no SMTP server is configured, so confirmation
emails land in ``<data dir>/mail/new`` where a person (or a test) can read them. The
sink speaks a small SMTP of its own (:class:`SinkSession`: ESMTP with PIPELINING,
SIZE, 8BITMIME and SMTPUTF8, one reply write per batch of pipelined commands) rather
than aiosmtpd's, which spends most of a message's CPU parsing each address with the
email package and awaiting a write per reply. Everything runs in the caller's event
loop: nothing is started at import time.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import email
import email.policy
import itertools
import logging
import mailbox
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Self, cast

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
        self._sessions: set[Any] = set()

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

    def _protocol(self) -> asyncio.Protocol:
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
    of a disk flush per message.

    The disk work runs on the event loop's own thread: the sink has nothing else to do
    meanwhile (what arrives waits in its socket and makes the next group), and a hop to
    a thread and back cost more than the writes, the GIL going back and forth at each
    system call (measured under load: a group's flush took 3.4 ms at p50 in a thread,
    1.6 ms of it ``syncfs``). ``flush_in_thread`` keeps the loop free instead, for a
    handler in a process that has other work.
    """

    def __init__(self, maildir: Path, *, fsync: bool = True, flush_in_thread: bool = False) -> None:
        self.maildir = Path(maildir)
        self.fsync = fsync
        self.flush_in_thread = flush_in_thread
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
        self._tmp = os.path.join(self.maildir, "tmp")
        self._new = os.path.join(self.maildir, "new")
        self._names = itertools.count()

    def submit(self, message: bytes) -> asyncio.Future[None]:
        """Queue ``message`` (with its trace headers) for delivery: the future is done
        once it is durable in ``new/``, or fails with the error that kept it out."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="orderflow-maildir")
        return future

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """aiosmtpd's hook: store the message with ``Return-Path`` and ``Delivered-To``."""
        content = envelope.original_content or b""
        future = self.submit(trace_headers(envelope.mail_from or "", envelope.rcpt_tos) + content)
        try:
            # Shielded: a session that goes away must not cancel its group's flush.
            await asyncio.shield(future)
        except OSError as exc:
            # A full or unwritable disk is temporary from the client's point of view;
            # aiosmtpd would answer 500 (permanent) to an exception.
            log.error("cannot deliver into %s: %s", self.maildir, exc)
            return REPLY_LOCAL_ERROR
        return REPLY_ACCEPTED

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            errors: list[BaseException | None]
            messages = [data for data, _ in group]
            try:
                if self.flush_in_thread:
                    errors = list(await asyncio.to_thread(self._deliver_group, messages))
                else:
                    errors = list(self._deliver_group(messages))
            except Exception as exc:
                errors = [exc] * len(group)
            except BaseException:
                for _, future in group:
                    future.cancel()
                raise
            self.flushes += 1
            self.delivered += errors.count(None)
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
        tmp, new = self._tmp, self._new
        # Unique: the time, the process and a counter of this handler (Maildir's Q<n>).
        stem = f"{time.time_ns()}.P{os.getpid()}Q"
        for i, data in enumerate(messages):
            name = f"{stem}{next(self._names)}.{self._host}"
            try:
                with open(os.path.join(tmp, name), "xb") as file:
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
        try:
            if self.fsync and self._syncfs is not None:
                self._sync_filesystem()
            for i, name in written:
                try:
                    os.rename(os.path.join(tmp, name), os.path.join(new, name))
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


def trace_headers(mail_from: str, rcpt_tos: Iterable[str]) -> bytes:
    """``Return-Path`` and one ``Delivered-To`` per recipient, as an MDA prepends them."""
    trace = f"Return-Path: <{mail_from}>\r\n"
    trace += "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in rcpt_tos)
    return trace.encode("utf-8", "surrogateescape")


REPLY_ACCEPTED = "250 Message accepted for delivery"
REPLY_LOCAL_ERROR = "451 Requested action aborted: local error in processing"
#: Longest command line taken (RFC 5321 says 512; SMTPUTF8 addresses and ESMTP
#: parameters may need more).
MAX_COMMAND_LINE = 2048
#: Seconds a session may stay silent before it is closed (RFC 5321's server timeout).
IDLE_TIMEOUT_S = 300.0
_END_OF_DATA = b"\r\n.\r\n"
_HELP = "250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"


class SinkSession(asyncio.Protocol):
    """One SMTP session of the sink: RFC 5321 server side, with PIPELINING.

    Commands are parsed straight from the connection's bytes, and the replies to a
    batch of pipelined commands leave in one write. A message's 250 is sent only once
    the handler has made it durable; commands pipelined behind it wait until then, so
    replies keep their order.
    """

    def __init__(
        self,
        handler: MaildirHandler,
        sessions: set[SinkSession],
        *,
        hostname: str,
        data_size_limit: int = DATA_SIZE_LIMIT,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.idle_timeout_s = idle_timeout_s
        self.transport: asyncio.Transport | None = None
        self._sessions = sessions
        self._buffer = bytearray()
        self._replies: list[str] = []
        self._greeted = False
        self._mail_from: str | None = None
        self._rcpt_tos: list[str] = []
        self._in_data = False
        #: The message is bigger than allowed: read to its end, then refuse it.
        self._data_too_big = False
        #: A command line longer than allowed: skip to its end, then refuse it.
        self._skipping_line = False
        #: A delivery in flight: later commands wait for its reply.
        self._waiting = False
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet the client."""
        # A cast, not an isinstance check: uvloop's transports are not asyncio's classes.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._sessions.add(self)
        loop = asyncio.get_running_loop()
        self._last_active = loop.time()
        self._idle_timer = loop.call_later(self.idle_timeout_s, self._check_idle)
        transport.write(f"220 {self.hostname} ESMTP orderflow sink\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session (a delivery in flight still completes)."""
        self._sessions.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        """Take what arrived and answer every complete command in it."""
        self._buffer += data
        self._last_active = asyncio.get_running_loop().time()
        self._process()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._last_active
        if silent >= self.idle_timeout_s and not self._waiting:
            self.transport.write(b"421 Timeout, closing the connection\r\n")
            self.transport.close()
            return
        self._idle_timer = loop.call_later(max(self.idle_timeout_s - silent, 1.0), self._check_idle)

    # -- the command loop ----------------------------------------------------------------

    def _process(self) -> None:
        while not self._waiting and self.transport is not None:
            if self._in_data:
                if not self._take_message():
                    break
                continue
            line = self._take_line()
            if line is None:
                break
            self._command(line)
        self._send_replies()

    def _send_replies(self) -> None:
        if self._replies and self.transport is not None:
            self.transport.write(("\r\n".join(self._replies) + "\r\n").encode())
        self._replies.clear()

    def _take_line(self) -> str | None:
        """The next complete command line, or None until one is in."""
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    del self._buffer[:]
                    self._skipping_line = True
                return None
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if not self._skipping_line and len(raw) <= MAX_COMMAND_LINE:
                return raw.rstrip(b"\r").decode("utf-8", "surrogateescape")
            self._skipping_line = False
            self._replies.append("500 Error: line too long")

    def _take_message(self) -> bool:
        """Take the message's content once its end (a lone ``.``) is in; False before."""
        buffer = self._buffer
        if not self._data_too_big and buffer.startswith(b".\r\n"):
            content, end = b"", 3
        else:
            found = buffer.find(_END_OF_DATA)
            if found < 0:
                if len(buffer) > self.data_size_limit:
                    # Keep only what could be the start of the end marker.
                    del buffer[: len(buffer) - len(_END_OF_DATA) + 1]
                    self._data_too_big = True
                return False
            content, end = bytes(buffer[: found + 2]), found + len(_END_OF_DATA)
        del buffer[:end]
        self._in_data = False
        mail_from, rcpt_tos = self._mail_from or "", self._rcpt_tos
        self._reset()
        if self._data_too_big or len(content) > self.data_size_limit:
            self._data_too_big = False
            self._replies.append("552 Error: Too much mail data")
            return True
        # Transparency (RFC 5321 4.5.2): a line's leading dot was doubled by the client.
        if content.startswith(b".."):
            content = content[1:]
        content = content.replace(b"\r\n..", b"\r\n.")
        self._waiting = True
        future = self.handler.submit(trace_headers(mail_from, rcpt_tos) + content)
        future.add_done_callback(self._delivered)
        return True

    def _delivered(self, future: asyncio.Future[None]) -> None:
        self._waiting = False
        error = future.exception() if not future.cancelled() else None
        if future.cancelled() or error is not None:
            if error is not None:
                log.error("cannot deliver into %s: %s", self.handler.maildir, error)
            self._replies.append(REPLY_LOCAL_ERROR)
        else:
            self._replies.append(REPLY_ACCEPTED)
        self._process()

    def _reset(self) -> None:
        self._mail_from = None
        self._rcpt_tos = []

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb, arg = verb.upper(), arg.strip()
        reply = self._reply(verb, arg)
        self._replies.append(reply)
        if verb == "QUIT" and self.transport is not None:
            self._send_replies()
            self.transport.close()
            self.transport = None

    def _reply(self, verb: str, arg: str) -> str:
        if verb == "EHLO" or verb == "HELO":
            if not arg:
                return f"501 Syntax: {verb} hostname"
            self._greeted = True
            self._reset()
            if verb == "HELO":
                return f"250 {self.hostname}"
            return (
                f"250-{self.hostname}\r\n250-SIZE {self.data_size_limit}\r\n"
                "250-8BITMIME\r\n250-SMTPUTF8\r\n250-PIPELINING\r\n250 HELP"
            )
        if verb == "MAIL":
            return self._mail(arg)
        if verb == "RCPT":
            return self._rcpt(arg)
        if verb == "DATA":
            if arg:
                return "501 Syntax: DATA"
            if not self._rcpt_tos:
                return "503 Error: need RCPT command"
            self._in_data = True
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb == "RSET":
            self._reset()
            return "250 OK"
        if verb == "NOOP":
            return "250 OK"
        if verb == "QUIT":
            return "221 Bye"
        if verb == "VRFY":
            return "252 Cannot VRFY user, but will accept message and attempt delivery"
        if verb == "HELP":
            return _HELP
        if not verb:
            return "500 Error: bad syntax"
        return f'500 Error: command "{verb[:32]}" not recognized'

    def _mail(self, arg: str) -> str:
        if not self._greeted:
            return "503 Error: send HELO first"
        if self._mail_from is not None:
            return "503 Error: nested MAIL command"
        path, params = _split_path(arg, "FROM:")
        if path is None:
            return "501 Syntax: MAIL FROM: <address>"
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not value.isdigit():
                    return "501 Syntax: MAIL FROM: <address> SIZE=<n>"
                if int(value) > self.data_size_limit:
                    return "552 Error: message size exceeds fixed maximum message size"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 Error: BODY can only be one of 7BIT, 8BITMIME"
            elif key != "SMTPUTF8" or value:
                return "555 MAIL FROM parameters not recognized or not implemented"
        if path and not _plain_address(path):
            return "553 5.1.3 Error: malformed address"
        self._mail_from = path
        return "250 OK"

    def _rcpt(self, arg: str) -> str:
        if not self._greeted:
            return "503 Error: send HELO first"
        if self._mail_from is None:
            return "503 Error: need MAIL command"
        path, params = _split_path(arg, "TO:")
        if path is None:
            return "501 Syntax: RCPT TO: <address>"
        if params:
            return "555 RCPT TO parameters not recognized or not implemented"
        if not _plain_address(path):
            return "553 5.1.3 Error: malformed address"
        self._rcpt_tos.append(path)
        return "250 OK"


def _split_path(arg: str, keyword: str) -> tuple[str | None, list[str]]:
    """``FROM:<a@b> SIZE=10`` → ``("a@b", ["SIZE=10"])``; None when malformed."""
    if arg[: len(keyword)].upper() != keyword:
        return None, []
    rest = arg[len(keyword) :].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None, []
        path, params = rest[1:end], rest[end + 1 :].split()
    else:
        path, *params = rest.split() or [""]
        if not path:
            return None, []
    return path, params


def _plain_address(address: str) -> bool:
    """``local@domain`` with nothing that could break a header or a file name."""
    local, at, domain = address.rpartition("@")
    return bool(
        at
        and local
        and domain
        and address.isprintable()
        and not any(ch in address for ch in ' <>()[],;:"\\')
    )


class SmtpSink(SmtpServer):
    """The embedded sink: an SMTP server (SMTPUTF8 on) delivering into ``maildir``.

    Its sessions are :class:`SinkSession`, not aiosmtpd's (see the module's docstring).
    """

    def __init__(
        self,
        maildir: Path,
        host: str = "127.0.0.1",
        port: int = DEFAULT_SINK_PORT,
        *,
        fsync: bool = True,
        flush_in_thread: bool = False,
    ) -> None:
        self.maildir = Path(maildir)
        handler = MaildirHandler(self.maildir, fsync=fsync, flush_in_thread=flush_in_thread)
        super().__init__(handler, host=host, port=port)

    def _protocol(self) -> asyncio.Protocol:
        return SinkSession(
            self.handler,
            self._sessions,
            hostname=self.hostname,
            data_size_limit=self._options["data_size_limit"],
        )

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
