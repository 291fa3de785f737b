"""The bus's errors: what a handler raises to give up, and what is worth waiting out."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orderflow.bus.message import DecodeError

__all__ = ["TRANSIENT", "DecodeError", "PermanentError", "is_nogroup"]

#: Errors after which a caller waits and tries again instead of giving up: Redis out of
#: reach or slow. OSError covers the built-in ConnectionError and TimeoutError.
TRANSIENT: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


class PermanentError(Exception):
    """Raised by a handler for a failure that no retry can fix: dead-letter at once."""


def is_nogroup(exc: BaseException) -> bool:
    """Whether ``exc`` says the consumer group (or its stream) is gone.

    UNBLOCKED: the stream was deleted under a blocked read, and the group with it. In a
    pipeline redis-py wraps the reply: "Command # 1 (XCLAIM …) … ('NOGROUP …',)".
    """
    if not isinstance(exc, ResponseError):
        return False
    text = str(exc)
    return text.startswith(("NOGROUP", "UNBLOCKED")) or "NOGROUP " in text
