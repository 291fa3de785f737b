"""Opening Redis connections from URLs, and showing URLs without their secrets."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

SCHEMES = ("redis", "rediss", "unix")


def validate_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL, else raise ValueError saying what is wrong."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"Redis URL {redact_url(url)!r} must start with redis://, rediss:// or unix://"
        )
    return url


def connect(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` returning bytes; connects lazily."""
    validate_url(url)
    options.setdefault("socket_keepalive", True)
    options.setdefault("health_check_interval", 30)
    options.setdefault("socket_connect_timeout", 5)
    return aioredis.Redis.from_url(url, decode_responses=False, **options)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
