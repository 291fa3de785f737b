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
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from orderflow import tracing
from orderflow._compat.aiosmtplib import PIPELINING, pipelined_transaction
from orderflow.bus import redact_url
from orderflow.config import ConfigError
from orderflow.email import metrics
from orderflow.email.concurrency import (
    AdaptiveLimit,
    ConcurrencyLimiter,
    FixedLimit,
    LimitChange,
    Permit,
)
from orderflow.email.render import OutgoingEmail

log = logging.getLogger(__name__)

#: Seconds an SMTP command may take before the send counts as a transient failure.
DEFAULT_TIMEOUT_S = 30.0
#: Idle pooled connections older than this are closed rather than reused, since
#: servers drop idle clients (RFC 5321 allows 5 minutes) and a dead one costs a retry.
MAX_IDLE_S = 60.0
#: At most one log line per this many seconds about the concurrency limit's changes
#: (the gauge ``orderflow_email_smtp_concurrency_limit`` always has the current one).
LIMIT_LOG_EVERY_S = 5.0


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

#: The permits a ``holding`` block keeps until it ends (None: outside any such block).
_HELD: ContextVar[list[Permit] | None] = ContextVar("orderflow_smtp_held", default=None)


class Sender(Protocol):
    """The port through which the Email Service sends: one message, one recipient."""

    async def send(self, email: OutgoingEmail, *, before_transaction: Guard | None = None) -> None:
        """Deliver ``email`` to exactly its recipient; raise SendError on failure.

        ``before_transaction`` is awaited once the connection is ready, just before the
        SMTP transaction starts; whatever it raises aborts the send, unchanged.
        """
        ...

    def holding(self) -> contextlib.AbstractContextManager[None]:
        """A block (the caller's send and its record of it) until whose end each send
        inside it keeps its place in the sender's concurrency limit: a message
        transmitted and not yet recorded is what a crash would send twice."""
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


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError)


def _feedback(permit: Permit, exc: BaseException) -> None:
    """A timeout or a lost connection tells the limiter the server is overwhelmed
    (Postfix's negative feedback); other failures say nothing of its load."""
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError) or _is_connection_error(exc):
        permit.dropped()


class SmtpSender:
    """The SMTP adapter: a pool of at most ``pool_size`` reused aiosmtplib connections.

    A send takes an idle connection (or opens one), and gives it back on success; a
    connection that failed is closed and replaced on the next send.

    How many transactions are in flight at the server at once is ``limiter.limit``:
    with ``adaptive`` (the default) it follows the server's replies, from 1 up to
    ``max_in_flight`` (see :mod:`orderflow.email.concurrency`); otherwise it is
    ``pool_size``. A send waiting for its turn has sent nothing of its message.

    ``max_in_flight`` (default ``pool_size``) counts the sends a ``holding`` block
    keeps after their ``250`` too, being recorded, each holding no connection: the
    Email Service passes its concurrency, so that against a fast server as many sends
    are on their way as with the fixed pool (which gives a place back on the ``250``).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        adaptive: bool = True,
        max_in_flight: int | None = None,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be positive, got {pool_size}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
        self.config = SmtpConfig.from_url(url)
        self.url = redact_url(url)
        self.pool_size = pool_size
        self.adaptive = adaptive
        #: The destination as the limit's gauge and logs name it.
        self.destination = f"{self.config.host}:{self.config.port}"
        self._gauge = metrics.SMTP_CONCURRENCY_LIMIT.labels(self.destination)
        self._limit_logged_at: float | None = None
        self._limit_changes = 0
        algorithm = (
            AdaptiveLimit(max_in_flight or pool_size, on_change=self._limit_changed)
            if adaptive
            else FixedLimit(pool_size)
        )
        self.limiter = ConcurrencyLimiter(algorithm)
        self._gauge.set(self.limiter.limit)
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
        if not tracing.enabled:
            await self._send(email, before_transaction)
            return
        attributes = {"server.address": self.config.host, "server.port": self.config.port}
        with tracing.span("smtp send", attributes):
            await self._send(email, before_transaction)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Sends inside this block keep their place in the concurrency limit until it
        ends (see :class:`Sender`); outside one, a send gives it back on its 250. With
        the fixed limit (``adaptive=False``) nothing is held: the pool as it always was."""
        if not self.adaptive:
            yield
            return
        held: list[Permit] = []
        token = _HELD.set(held)
        try:
            yield
        finally:
            _HELD.reset(token)
            for permit in held:
                permit.release()

    async def _send(self, email: OutgoingEmail, before_transaction: Guard | None) -> None:
        # The permit first: a send waiting for one holds no connection and has
        # transmitted nothing, so a crash meanwhile cannot duplicate its email.
        permit = await self.limiter.acquire()
        try:
            async with self._slots:
                await self._send_on(email, before_transaction, permit)
        except BaseException:
            # Nothing sent (or nothing the caller will record): the place is free.
            permit.release()
            raise
        held = _HELD.get()
        if held is None:
            permit.release()
        else:
            # Sent, not yet recorded: the place is kept until the caller's block ends.
            held.append(permit)

    async def _send_on(
        self, email: OutgoingEmail, before_transaction: Guard | None, permit: Permit
    ) -> None:
        client, reused = await self._acquire()
        if before_transaction is not None:
            try:
                await before_transaction()
            except BaseException:
                self._idle.append((client, asyncio.get_running_loop().time()))
                raise
        while True:
            try:
                await self._timed(client, email, permit)
            except asyncio.CancelledError:
                client.close()
                raise
            except Exception as exc:
                client.close()
                if not (reused and _is_connection_error(exc)):
                    _feedback(permit, exc)
                    raise classify(exc) from exc
                # The server dropped a pooled connection while it was idle; a fresh
                # one is what a retry would do anyway, so do it now (once: a fresh
                # connection's failure is the send's).
                log.debug("pooled SMTP connection was closed (%s); reconnecting", exc)
                client, reused = await self._connect(), False
                continue
            break
        self._idle.append((client, asyncio.get_running_loop().time()))

    async def _timed(self, client: aiosmtplib.SMTP, email: OutgoingEmail, permit: Permit) -> None:
        """The transaction, its round trip reported to the limiter when the server
        answered (whatever it answered: a reply is a measure of its queue)."""
        permit.start()
        try:
            await self._transaction(client, email)
        except aiosmtplib.SMTPResponseException:
            permit.succeeded()
            raise
        permit.succeeded()

    def _limit_changed(self, change: LimitChange) -> None:
        self._gauge.set(change.new)
        self._limit_changes += 1
        now = time.monotonic()
        if self._limit_logged_at is not None and now - self._limit_logged_at < LIMIT_LOG_EVERY_S:
            return
        log.info(
            "SMTP %s: %d transaction(s) in flight at most, was %d (%s; %.0f replies/s, "
            "round trip %.1f ms, %.1f ms with the fewest in flight; %d change(s) since "
            "the last report)",
            self.destination,
            change.new,
            change.old,
            change.reason,
            change.rate,
            change.rtt_s * 1000,
            change.min_rtt_s * 1000,
            self._limit_changes,
        )
        self._limit_logged_at = now
        self._limit_changes = 0

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
        if PIPELINING.enabled and client.supports_extension("pipelining"):
            await pipelined_transaction(
                client,
                email.sender,
                email.recipient,
                email.data,
                options=options,
                encoding=encoding,
                timeout_s=self.config.timeout_s,
            )
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
        await self.limiter.close()
        idle, self._idle = self._idle, []
        for client, _ in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), timeout=1.0)
            client.close()
