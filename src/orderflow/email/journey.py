"""Each delivery's outcome, per order, for the console's journey page.

One capped list per order, ``orderflow:journey:{<order id>}`` (newest first, at most
:data:`KEEP` steps, kept as long as the email ledger keeps the order's record). The
braces are the ledger key's hash tag: an order's journey and ledger share a slot.

Recording never costs a delivery a round trip: :meth:`JourneyRecorder.note` only
appends to a buffer, and one script call writes every order's new steps a moment later
(or when the service stops); on a cluster, where the keys live in different slots, one
pipeline of per-order commands does. It is a diagnostic record, written best effort: a step
buffered when the process is killed is lost, and a Redis error drops the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orderflow.bus.partitions import is_cluster
from orderflow.email.ledger import SENT_TTL_S

log = logging.getLogger(__name__)

#: Prefix of the journey keys; the full key is ``orderflow:journey:{<order id>}``.
KEY_PREFIX = "orderflow:journey:"
#: Steps kept per order (the newest).
KEEP = 50
#: How long buffered steps wait to be written with the next ones.
FLUSH_AFTER_S = 0.05
#: Orders written per script call (a long batch is split).
_ORDERS_PER_CALL = 500

# KEYS the orders' journey keys; ARGV keep, ttl ms, then per key: its step count and
# its steps (oldest first). One command per batch instead of three per order: the
# client's CPU to pack commands is what a step costs.
_RECORD = """
local at = 3
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  redis.call('LPUSH', key, unpack(ARGV, at + 1, at + n))
  redis.call('LTRIM', key, 0, tonumber(ARGV[1]) - 1)
  redis.call('PEXPIRE', key, ARGV[2])
  at = at + n + 1
end
return #KEYS
"""

#: The outcomes a step records.
SENT = "sent"
DUPLICATE = "duplicate"
RETRIED = "retried"
DEAD_LETTERED = "dead-lettered"


def journey_key(order_id: int) -> str:
    """The journey key of an order."""
    return f"{KEY_PREFIX}{{{order_id}}}"


@dataclass(frozen=True, slots=True)
class Step:
    """One delivery of an order's entry and what came of it."""

    at: str
    consumer: str
    stream: str
    entry_id: str
    deliveries: int
    outcome: str
    reason: str | None = None
    message_id: str | None = None

    @classmethod
    def from_json(cls, raw: bytes | str) -> Step | None:
        """A step read back; None for a record this version cannot read."""
        try:
            data: Any = orjson.loads(raw)
            return cls(
                at=str(data["at"]),
                consumer=str(data["consumer"]),
                stream=str(data["stream"]),
                entry_id=str(data["entry_id"]),
                deliveries=int(data["deliveries"]),
                outcome=str(data["outcome"]),
                reason=data.get("reason"),
                message_id=data.get("message_id"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class JourneyRecorder:
    """Buffers steps and writes them in batches: one pipeline per :data:`FLUSH_AFTER_S`."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        keep: int = KEEP,
        ttl_s: int = SENT_TTL_S,
        flush_after_s: float = FLUSH_AFTER_S,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._redis = redis
        self._keep = keep
        self._ttl_ms = ttl_s * 1000
        self._flush_after_s = flush_after_s
        self._buffer: list[tuple[int, bytes]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._record = None if is_cluster(redis) else redis.register_script(_RECORD)

    def note(
        self,
        order_id: int,
        *,
        consumer: str,
        stream: str,
        entry_id: str,
        deliveries: int,
        outcome: str,
        reason: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Record a step (buffered; written within :data:`FLUSH_AFTER_S`)."""
        step = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "consumer": consumer,
            "stream": stream,
            "entry_id": entry_id,
            "deliveries": deliveries,
            "outcome": outcome,
            "reason": reason[:500] if reason else None,
            "message_id": message_id,
        }
        self._buffer.append((order_id, orjson.dumps(step)))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self._flush_after_s)
        await self.flush()

    async def flush(self) -> None:
        """Write every buffered step now (one pipeline); errors are logged, not raised."""
        steps, self._buffer = self._buffer, []
        if not steps:
            return
        by_order: dict[int, list[bytes]] = defaultdict(list)
        for order_id, step in steps:
            by_order[order_id].append(step)
        try:
            if self._record is None:
                await self._pipelined(by_order)
            else:
                orders = list(by_order.items())
                for start in range(0, len(orders), _ORDERS_PER_CALL):
                    keys: list[str] = []
                    args: list[int | bytes] = [self._keep, self._ttl_ms]
                    for order_id, recorded in orders[start : start + _ORDERS_PER_CALL]:
                        keys.append(journey_key(order_id))
                        args += (len(recorded), *recorded)
                    await self._record(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            log.warning("journey steps of %d order(s) not all recorded: %s", len(by_order), exc)

    async def _pipelined(self, by_order: dict[int, list[bytes]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for order_id, recorded in by_order.items():
                key = journey_key(order_id)
                pipe.lpush(key, *recorded)
                pipe.ltrim(key, 0, self._keep - 1)
                pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    async def close(self) -> None:
        """Write what is buffered (the service is stopping)."""
        task = self._flushing
        if task is not None and not task.done():
            # Awaited, not cancelled: it may be writing a batch already (a moment at most).
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()


async def read_journey(redis: aioredis.Redis, order_id: int) -> list[Step]:
    """An order's recorded steps, oldest first."""
    raw: Any = await redis.lrange(journey_key(order_id), 0, -1)
    steps = (Step.from_json(item) for item in reversed(raw))
    return [step for step in steps if step is not None]
