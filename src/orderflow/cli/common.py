"""Pieces every command shares: errors, settings, Redis clients, signals."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal, InvalidOperation

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from orderflow.bus import connect, redact_url
from orderflow.config import Settings, resolve_redis_url


class UsageError(ValueError):
    """A bad argument: reported with exit code 2, nothing changed."""


class CommandError(RuntimeError):
    """A command that could not do its job: reported with exit code 1."""


def load_settings() -> Settings:
    """Settings from the environment (a bad value raises pydantic's ValidationError)."""
    return Settings()


@asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A connected client, or a CommandError naming the (redacted) URL."""
    url = resolve_redis_url(settings)
    client = connect(url)
    try:
        try:
            await client.ping()
        except (RedisConnectionError, OSError) as exc:
            raise CommandError(f"cannot reach Redis at {redact_url(url)}: {exc}") from None
        yield client
    finally:
        await client.aclose()


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
