"""Pieces every command shares: errors, settings, Redis clients, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orderflow.bus import connect, redact_url
from orderflow.config import Settings, resolve_redis_url

log = logging.getLogger(__name__)

#: Longest pause between two attempts to reach Redis while waiting for it.
MAX_CONNECT_BACKOFF_S = 5.0
#: How often a service still waiting for Redis says so.
WAITING_REPORT_S = 30.0


class UsageError(ValueError):
    """A bad argument: reported with exit code 2, nothing changed."""


class CommandError(RuntimeError):
    """A command that could not do its job: reported with exit code 1."""


def load_settings() -> Settings:
    """Settings from the environment (a bad value raises pydantic's ValidationError)."""
    return Settings()


@asynccontextmanager
async def redis_client(
    settings: Settings, *, wait_unless: asyncio.Event | None = None
) -> AsyncIterator[aioredis.Redis]:
    """A connected client, or a CommandError naming the (redacted) URL.

    A long-running service passes ``wait_unless`` (its stop event): then a Redis that
    is down or still loading is waited for, with backoff, until it answers or the
    event is set (the client is then yielded unconnected: check the event). A wrong
    password, an ACL refusal or a certificate that fails verification is a
    configuration error and fails at once either way.
    """
    url = resolve_redis_url(settings)
    client = connect(url)
    try:
        await _reach(client, url, wait_unless)
        yield client
    finally:
        await client.aclose()


async def _reach(client: aioredis.Redis, url: str, wait_unless: asyncio.Event | None) -> None:
    delay = 0.1
    started = time.monotonic()
    #: When the wait was last logged (None: Redis answered at the first try).
    reported: float | None = None
    while True:
        try:
            await client.ping()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            reason = describe_connection_error(exc)
            if wait_unless is None or _is_configuration_error(exc):
                raise CommandError(f"cannot reach Redis at {redact_url(url)}: {reason}") from None
            now = time.monotonic()
            if reported is None or now - reported >= WAITING_REPORT_S:
                reported = now
                log.warning(
                    "cannot reach Redis at %s (%s); waiting for it (%.0f s so far)",
                    redact_url(url),
                    reason,
                    now - started,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait_unless.wait(), delay)
                return
            delay = min(delay * 2, MAX_CONNECT_BACKOFF_S)
            continue
        if reported is not None:
            log.warning(
                "Redis at %s reachable after %.1f s", redact_url(url), time.monotonic() - started
            )
        return


def _is_configuration_error(exc: BaseException) -> bool:
    """Errors that waiting does not cure: credentials and TLS verification."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, AuthenticationError | ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


# OpenSSL's verification codes that mean "no trusted CA signed this certificate".
_UNTRUSTED_CODES = frozenset({2, 18, 19, 20, 21})
# Host name, e-mail and IP address mismatches.
_HOST_MISMATCH_CODES = frozenset({62, 63, 64})
_EXPIRED_CODE = 10


def describe_connection_error(exc: BaseException) -> str:
    """Why a connection failed, in words; TLS verification failures say what to fix.

    redis-py reports a failed certificate check as "Error 1 connecting to … [SSL:
    CERTIFICATE_VERIFY_FAILED] … self-signed certificate in certificate chain", which
    does not tell a user that the CA is the problem.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "TLS certificate verification failed: " + _verification_advice(cause)
        if isinstance(cause, ssl.SSLError):
            return (
                f"TLS handshake failed ({cause.reason or cause}); is that port serving "
                "TLS, and does it accept this client?"
            )
        cause = cause.__cause__ or cause.__context__
    return str(exc)


def _verification_advice(error: ssl.SSLCertVerificationError) -> str:
    detail = error.verify_message or str(error)
    if error.verify_code in _UNTRUSTED_CODES:
        return (
            f"the server's certificate is not signed by a trusted CA ({detail}); give the "
            "CA that signed it with ?ssl_ca_certs=/path/to/ca.pem in the URL"
        )
    if error.verify_code in _HOST_MISMATCH_CODES:
        return f"{detail.rstrip('.')}; connect with a host name the certificate lists"
    if error.verify_code == _EXPIRED_CODE:
        return f"the server's certificate has expired ({detail})"
    return detail


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT and SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def parse_total(text: str) -> Decimal:
    """A positive amount with at most two decimals, or a UsageError."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise UsageError(f"--total {text!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise UsageError(f"--total must be greater than 0, got {text}")
    if value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise UsageError(f"--total {text} has more than 2 decimals")
    return value


def parse_order_id(text: str) -> int:
    """A positive integer order id, or a UsageError."""
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--id {text!r} is not an integer") from None
    if value < 1:
        raise UsageError(f"--id must be a positive integer, got {value}")
    return value


def parse_email(text: str) -> str:
    """A syntactically valid address, normalised, or a UsageError."""
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise UsageError(f"--email {text!r} is not a valid address: {exc}") from None
