"""Sending emails: the sender port, its SMTP adapter (aiosmtplib), and error classes.

Failures are sorted into two kinds that the Email Service treats differently:
:class:`TransientSendError` (4xx replies, refused or dropped connections, timeouts:
retry later) and :class:`PermanentSendError` (5xx replies to this message, a refused
recipient, an address the server cannot take: no retry will help).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.protocol import SMTPProtocol

from orderflow.bus import redact_url
from orderflow.config import ConfigError
from orderflow.email.render import OutgoingEmail

log = logging.getLogger(__name__)

#: Seconds an SMTP command may take before the send counts as a transient failure.
DEFAULT_TIMEOUT_S = 30.0
#: Idle pooled connections older than this are closed rather than reused, since
#: servers drop idle clients (RFC 5321 allows 5 minutes) and a dead one costs a retry.
MAX_IDLE_S = 60.0


class SendError(Exception):
    """Sending one email failed; ``permanent`` says whether a retry could help."""

    permanent = False

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The SMTP reply code, when the server gave one.
        self.code = code


class TransientSendError(SendError):
    """A failure that may pass: 4xx, connection refused or lost, timeout."""


class SmtpUnreachable(TransientSendError):
    """The SMTP server could not be reached or refused the session (connect, greeting,
    TLS, login): nothing of this email was sent."""


class PermanentSendError(SendError):
    """A failure no retry can fix: 5xx to this message, recipient refused."""

    permanent = True


#: A last check before the SMTP transaction (the Email Service's "do I still own it?").
Guard = Callable[[], Awaitable[None]]


class Sender(Protocol):
    """The port through which the Email Service sends: one message, one recipient."""

    async def send(self, email: OutgoingEmail, *, before_transaction: Guard | None = None) -> None:
        """Deliver ``email`` to exactly its recipient; raise SendError on failure.

        ``before_transaction`` is awaited once the connection is ready, just before the
        SMTP transaction starts; whatever it raises aborts the send, unchanged.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to connect, parsed from an ``smtp://`` or ``smtps://`` URL.

    ``smtp://user:pass@host:587`` upgrades with STARTTLS when the server offers it;
    ``smtps://host:465`` is TLS from the start. Query options: ``timeout`` (seconds),
    ``verify=false`` (accept any certificate: local test servers only).
    """

    host: str
    port: int
    use_tls: bool
    username: str | None
    password: str | None
    timeout_s: float
    validate_certs: bool

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        """Parse ``url``; ConfigError names what is wrong (without the password)."""
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"SMTP URL {shown!r} is invalid: {exc}") from None
        if parts.scheme not in ("smtp", "smtps"):
            raise ConfigError(f"SMTP URL {shown!r} must start with smtp:// or smtps://")
        if not parts.hostname:
            raise ConfigError(f"SMTP URL {shown!r} has no host")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"timeout", "verify"}
        if unknown:
            raise ConfigError(f"SMTP URL {shown!r}: unknown option(s) {sorted(unknown)}")
        try:
            timeout = float(options.get("timeout", DEFAULT_TIMEOUT_S))
        except ValueError:
            raise ConfigError(f"SMTP URL {shown!r}: timeout must be a number") from None
        if not timeout > 0:
            raise ConfigError(f"SMTP URL {shown!r}: timeout must be positive")
        verify = options.get("verify", "true").lower()
        if verify not in ("true", "false", "1", "0"):
            raise ConfigError(f"SMTP URL {shown!r}: verify must be true or false")
        use_tls = parts.scheme == "smtps"
        return cls(
            host=parts.hostname,
            port=port or (465 if use_tls else 25),
            use_tls=use_tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout_s=timeout,
            validate_certs=verify in ("true", "1"),
        )


def classify(exc: BaseException) -> SendError:
    """The SendError an aiosmtplib (or socket) exception amounts to."""
    if isinstance(exc, SendError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        if any(code >= 500 for code in codes):
            return PermanentSendError(f"recipient refused: {detail}", code=max(codes))
        return TransientSendError(f"recipient deferred: {detail}", code=min(codes or [0]))
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # Raised before anything is sent when the address needs SMTPUTF8 and the
        # server lacks it: this server will never take this address.
        return PermanentSendError(f"not supported by the server: {exc}")
    # Authentication and greeting failures are the server's or our configuration's,
    # not this email's: retry (and dead-letter after the bus's limit), never drop.
    if isinstance(
        exc,
        aiosmtplib.SMTPAuthenticationError
        | aiosmtplib.SMTPHeloError
        | aiosmtplib.SMTPConnectResponseError,
    ):
        return TransientSendError(f"SMTP session failed: {exc.code} {exc.message}", code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = f"{exc.code} {exc.message}"
        if 500 <= exc.code < 600:
            return PermanentSendError(f"rejected: {text}", code=exc.code)
        return TransientSendError(f"deferred: {text}", code=exc.code)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return TransientSendError(f"timed out: {exc or type(exc).__name__}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        return TransientSendError(f"connection failed: {exc or type(exc).__name__}")
    return TransientSendError(f"{type(exc).__name__}: {exc}")


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO where EHLO is refused (as aiosmtplib's mail() would)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


#: Longest reply line taken (aiosmtplib's limit).
_MAX_REPLY_LINE = 8192
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


async def _pipelined_transaction(
    client: aiosmtplib.SMTP,
    email: OutgoingEmail,
    options: list[str],
    encoding: str,
    timeout_s: float,
) -> None:
    """MAIL, RCPT and DATA in one write, then the content (RFC 2920 PIPELINING): two
    round trips and two writes per email instead of four of each.

    aiosmtplib reads one reply per command it wrote (and drops replies that arrive
    early), so for the transaction the connection's replies go to :class:`_Replies`;
    the connection goes back to aiosmtplib's protocol afterwards. Errors are the ones
    aiosmtplib's mail(), rcpt() and data() raise, in the same order.
    """
    smtp = client.protocol
    transport = cast(asyncio.WriteTransport | None, smtp.transport if smtp is not None else None)
    if smtp is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    for address in (email.sender, email.recipient):
        if _CONTROL.search(address):
            raise ValueError("Command arg contains a prohibited control character")
    params = "".join(" " + option for option in options)
    commands = f"MAIL FROM:<{email.sender}>{params}\r\nRCPT TO:<{email.recipient}>\r\nDATA\r\n"
    content = _LINE_END.sub(b"\r\n", email.data)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    content = _LEADING_DOT.sub(b"..", content) + b".\r\n"
    replies = _Replies(smtp)
    transport.set_protocol(replies)
    try:
        transport.write(commands.encode(encoding))
        mail = await replies.next(timeout_s)
        rcpt = await replies.next(timeout_s)
        data = await replies.next(timeout_s)
        if mail.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, email.sender)
        if rcpt.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
            raise aiosmtplib.SMTPRecipientRefused(rcpt.code, rcpt.message, email.recipient)
        if data.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(data.code, data.message)
        transport.write(content)
        done = await replies.next(timeout_s)
        if done.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(done.code, done.message)
    finally:
        if not transport.is_closing():
            transport.set_protocol(smtp)


class _Replies(asyncio.Protocol):
    """Collects an SMTP server's replies while a pipelined transaction has the
    connection; its connection events still reach aiosmtplib's protocol."""

    def __init__(self, smtp: SMTPProtocol) -> None:
        self._smtp = smtp
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next(self, timeout_s: float) -> SMTPResponse:
        """The next reply, waiting at most ``timeout_s`` for it."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply (a reply's lines but its last have ``-``)."""
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > _MAX_REPLY_LINE or not line[:3].isdigit():
                self._error = aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, f"Malformed SMTP response line: {line[:80]!r}"
                )
                break
            self._lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
                self._replies.append(
                    SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape"))
                )
                self._lines.clear()
        self._wake()

    def eof_received(self) -> bool:
        """The server closed its side: no more replies will come."""
        self._error = self._error or aiosmtplib.SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the transaction, and tell aiosmtplib's protocol the connection is gone."""
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._error = self._error or error
        self._wake()
        self._smtp.connection_lost(exc)

    def pause_writing(self) -> None:
        """Flow control stays with aiosmtplib's protocol."""
        self._smtp.pause_writing()

    def resume_writing(self) -> None:
        """Flow control stays with aiosmtplib's protocol."""
        self._smtp.resume_writing()


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError)


class SmtpSender:
    """The SMTP adapter: a pool of at most ``pool_size`` reused aiosmtplib connections.

    A send takes an idle connection (or opens one), and gives it back on success; a
    connection that failed is closed and replaced on the next send.
    """

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be positive, got {pool_size}")
        self.config = SmtpConfig.from_url(url)
        self.url = redact_url(url)
        self.pool_size = pool_size
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        #: Connections opened so far, for tests and metrics.
        self.connections_opened = 0
        # aiosmtplib would otherwise call socket.getfqdn(), a DNS lookup per connection.
        self._local_hostname = socket.gethostname() or "localhost"

    async def send(self, email: OutgoingEmail, *, before_transaction: Guard | None = None) -> None:
        """Send ``email`` to its one recipient (the envelope, not the headers, decides).

        ``before_transaction`` runs after connecting (which can take long), right before
        MAIL FROM; an exception from it aborts the send as it is, nothing sent.
        """
        async with self._slots:
            client, reused = await self._acquire()
            if before_transaction is not None:
                try:
                    await before_transaction()
                except BaseException:
                    self._idle.append((client, asyncio.get_running_loop().time()))
                    raise
            try:
                await self._transaction(client, email)
            except asyncio.CancelledError:
                client.close()
                raise
            except Exception as exc:
                client.close()
                if not (reused and _is_connection_error(exc)):
                    raise classify(exc) from exc
                # The server dropped a pooled connection while it was idle; a
                # fresh one is what a retry would do anyway, so do it now.
                log.debug("pooled SMTP connection was closed (%s); reconnecting", exc)
                client = await self._connect()
                try:
                    await self._transaction(client, email)
                except asyncio.CancelledError:
                    client.close()
                    raise
                except Exception as exc2:
                    client.close()
                    raise classify(exc2) from exc2
            self._idle.append((client, asyncio.get_running_loop().time()))

    async def _transaction(self, client: aiosmtplib.SMTP, email: OutgoingEmail) -> None:
        # MAIL, RCPT and DATA directly rather than sendmail(): the addresses were
        # validated already (sendmail parses each twice more), and a failed
        # transaction needs no RSET because its connection is closed anyway.
        if client.is_ehlo_or_helo_needed:
            # On smtps:// aiosmtplib greets only at the first MAIL; the extensions
            # (SMTPUTF8, PIPELINING) must be known before it.
            await _greet(client)
        options: list[str] = []
        encoding = "ascii"
        if email.smtputf8:
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported(
                    "the address needs SMTPUTF8, which the server does not offer"
                )
            options, encoding = ["SMTPUTF8"], "utf-8"
        if client.supports_extension("pipelining"):
            await _pipelined_transaction(client, email, options, encoding, self.config.timeout_s)
            return
        await client.mail(email.sender, options=options, encoding=encoding)
        await client.rcpt(email.recipient, encoding=encoding)
        await client.data(email.data)

    async def _acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        now = asyncio.get_running_loop().time()
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and now - since < MAX_IDLE_S:
                return client, True
            client.close()
        return await self._connect(), False

    async def _connect(self) -> aiosmtplib.SMTP:
        cfg = self.config
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            username=cfg.username,
            password=cfg.password,
            use_tls=cfg.use_tls,
            # None: STARTTLS when the server offers it (never on smtps://).
            start_tls=False if cfg.use_tls else None,
            validate_certs=cfg.validate_certs,
            timeout=cfg.timeout_s,
            local_hostname=self._local_hostname,
        )
        try:
            await client.connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = classify(exc)
            if error.permanent:
                raise error from exc
            raise SmtpUnreachable(error.reason, code=error.code) from exc
        self.connections_opened += 1
        return client

    async def close(self) -> None:
        """Say QUIT on idle connections and close them."""
        idle, self._idle = self._idle, []
        for client, _ in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), timeout=1.0)
            client.close()
