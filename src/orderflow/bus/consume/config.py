"""What a consumer consumes and how (WorkerConfig), and what it did (WorkerStats)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from orderflow.bus.consume.retry import backoff_s
from orderflow.bus.keys import StreamKeys

__all__ = ["ConsumerSettings", "WorkerConfig", "WorkerStats", "consumer_name", "sum_stats"]

#: The longest retry delay when none is set (or the base, when that is longer).
DEFAULT_RETRY_MAX_MS = 30_000


def consumer_name() -> str:
    """A unique consumer name: host, process and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ConsumerSettings(Protocol):
    """The application settings a consumer takes its delivery policy from."""

    @property
    def claim_idle_ms(self) -> int:
        """How long an entry may sit idle before another consumer claims it."""

    @property
    def max_deliveries(self) -> int:
        """Deliveries before an entry is dead-lettered."""

    @property
    def dlq_maxlen(self) -> int:
        """Approximate cap of a dead-letter stream."""

    @property
    def retry_base_ms(self) -> int:
        """First retry delay."""

    @property
    def retry_max_ms(self) -> int:
        """Longest retry delay."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker consumes and how; validated on construction."""

    stream: str
    group: str
    consumer: str = field(default_factory=consumer_name)
    #: Where a new group starts: ``0`` so nothing published before it existed is missed.
    start_id: str = "0"
    concurrency: int = 64
    batch_size: int = 100
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    #: How often to look for idle entries to claim; default: a quarter of claim_idle_ms.
    claim_interval_ms: int | None = None
    max_deliveries: int = 5
    retry_base_ms: int = 200
    #: Unset: 30 s, or retry_base_ms when that is longer.
    retry_max_ms: int | None = None
    shutdown_timeout_s: float = 10.0
    dlq_maxlen: int = 100_000
    #: Consumers idle this long with nothing pending are removed from the group.
    prune_idle_ms: int | None = 3_600_000
    reconnect_max_s: float = 5.0

    def __post_init__(self) -> None:
        StreamKeys(self.stream)
        for name in ("group", "consumer", "start_id"):
            value = getattr(self, name)
            if not value or any(ch.isspace() for ch in value):
                raise ValueError(f"WorkerConfig.{name} must be non-empty without spaces")
        positive = {
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "block_ms": self.block_ms,
            "claim_idle_ms": self.claim_idle_ms,
            "max_deliveries": self.max_deliveries,
            "retry_base_ms": self.retry_base_ms,
            "retry_max_ms": self.retry_cap_ms,
            "dlq_maxlen": self.dlq_maxlen,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WorkerConfig.{name} must be a positive integer, got {value!r}")
        if self.retry_max_ms is not None and self.retry_max_ms < self.retry_base_ms:
            raise ValueError(
                f"WorkerConfig.retry_max_ms ({self.retry_max_ms}) must be at least "
                f"retry_base_ms ({self.retry_base_ms}): the longest retry delay cannot be "
                "shorter than the first"
            )
        if self.claim_interval_ms is not None and self.claim_interval_ms < 1:
            raise ValueError("WorkerConfig.claim_interval_ms must be positive")
        if self.shutdown_timeout_s < 0:
            raise ValueError("WorkerConfig.shutdown_timeout_s must not be negative")
        if self.prune_idle_ms is not None and self.prune_idle_ms < self.claim_idle_ms:
            raise ValueError("WorkerConfig.prune_idle_ms must be at least claim_idle_ms")

    @classmethod
    def from_settings(
        cls, settings: ConsumerSettings, *, stream: str, group: str, **options: Any
    ) -> WorkerConfig:
        """The config of a consumer of ``stream`` as ``group``, with the settings' delivery
        policy (claim timeout, deliveries, retry delays, dead-letter cap); ``options``
        set the rest (concurrency, consumer, block_ms ...) or override."""
        policy: dict[str, Any] = {
            "claim_idle_ms": settings.claim_idle_ms,
            "max_deliveries": settings.max_deliveries,
            "dlq_maxlen": settings.dlq_maxlen,
            "retry_base_ms": settings.retry_base_ms,
            "retry_max_ms": settings.retry_max_ms,
        }
        return cls(stream=stream, group=group, **{**policy, **options})

    @property
    def keys(self) -> StreamKeys:
        """The stream's keys (and its dead-letter stream)."""
        return StreamKeys(self.stream)

    @property
    def retry_cap_ms(self) -> int:
        """The longest retry delay in effect."""
        if self.retry_max_ms is not None:
            return self.retry_max_ms
        return max(DEFAULT_RETRY_MAX_MS, self.retry_base_ms)

    @property
    def claim_interval_s(self) -> float:
        """Seconds between two looks for idle entries."""
        if self.claim_interval_ms is not None:
            return self.claim_interval_ms / 1000
        return max(0.05, self.claim_idle_ms / 4000)

    @property
    def heartbeat_interval_s(self) -> float:
        """Seconds between two refreshes of the idle time of held entries."""
        return max(0.02, self.claim_idle_ms / 3000)

    def backoff_s(self, deliveries: int) -> float:
        """Delay before delivery ``deliveries + 1``: exponential, capped, full jitter."""
        return backoff_s(deliveries, self.retry_base_ms, self.retry_cap_ms)


@dataclass(slots=True)
class WorkerStats:
    """Counts of what one worker did, for tests, status lines and burst runs."""

    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    acked: int = 0
    redis_errors: int = 0


def sum_stats(parts: list[WorkerStats]) -> WorkerStats:
    """The counts of several workers (or runs of one), added up."""
    total = WorkerStats()
    for part in parts:
        for f in fields(WorkerStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    return total
