"""What every case shares: the private Redis server, CPU pinning, the payload, statistics."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from orderflow.bus.message import Message, encode
from orderflow.embedded.redis_server import RedisServer

#: The core the Redis server runs on, and the one the clients (this process) run on.
SERVER_CPU = 0
CLIENT_CPU = 1
STREAM = "bench:orders"
GROUP = "bench"


def can_pin() -> bool:
    """True when this machine has two cores to split and ``taskset`` to pin the server."""
    return shutil.which("taskset") is not None and len(os.sched_getaffinity(0)) >= 2


class PinnedRedisServer(RedisServer):
    """A private ``redis-server`` started under ``taskset`` on :data:`SERVER_CPU`."""

    def __init__(self, directory: Path, *, pin: bool) -> None:
        # No persistence: the cases measure the bus and its clients, not the disk.
        super().__init__(directory, appendonly=False, die_with_parent=True)
        self.pin = pin

    def command(self) -> list[str]:
        """The server's command line, behind ``taskset -c`` when pinning."""
        args = super().command()
        if self.pin:
            return ["taskset", "-c", str(SERVER_CPU), *args]
        return args


def pin_client(pin: bool) -> None:
    """Pin this process (the clients) to :data:`CLIENT_CPU`, away from the server."""
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})


def order_data(i: int) -> dict[str, Any]:
    """An ``order.created`` payload of about 200 bytes of JSON."""
    return {
        "id": 100_000 + i,
        "email": f"customer{i:07d}@example.com",
        "total": Decimal("123.45"),
        "currency": "USD",
        "items": [
            {"sku": "SKU-1042", "qty": 2, "price": "49.90"},
            {"sku": "SKU-0007", "qty": 1, "price": "23.65"},
        ],
        "created_at": "2026-11-26T21:36:19.123+00:00",
    }


def order_message(i: int) -> Message:
    """The ``order.created`` event for ``order_data(i)``, with its CloudEvents headers."""
    return Message.event("order.created", order_data(i), source="orderflow/orders")


def flat_fields(message: Message) -> list[bytes | str]:
    """A message's stream fields as XADD arguments (name, value, name, value ...)."""
    flat: list[bytes | str] = []
    for key, value in encode(message).items():
        flat += [key, value]
    return flat


def data_bytes(i: int) -> bytes:
    """The JSON payload alone, as a producer with nothing but XADD would send it."""
    return orjson.dumps(order_data(i), default=str)


@dataclass
class Figure:
    """One measured number of one contender in one case."""

    case: str
    contender: str
    value: float
    unit: str
    note: str = ""
    #: Extra numbers shown beside the value (latency percentiles, RSS points ...).
    extra: dict[str, float] = field(default_factory=dict)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, nearest rank."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    """The median of a few repeated measurements."""
    return statistics.median(values)


@dataclass(frozen=True)
class Throughput:
    """One throughput measurement: entries per second of wall time, and CPU per entry.

    The CPU is this process's (the client's): other processes on a busy machine stretch
    the wall time of whichever contender they happen to hit, much less its CPU time.
    """

    rate: float
    cpu_us: float


class Stopwatch:
    """Wall time (``time.perf_counter``) and this process's CPU time of a block."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds = self.cpu_seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start

    def throughput(self, count: int) -> Throughput:
        """``count`` entries over the block's wall time, and its CPU per entry."""
        return Throughput(count / self.seconds, self.cpu_seconds / count * 1e6)


#: The key of a throughput figure's client CPU per entry in ``Figure.extra``.
CPU_US = "client CPU µs/entry"


def throughput_figure(
    case: str, contender: str, samples: Sequence[Throughput], note: str = ""
) -> Figure:
    """The median of repeated throughput measurements of one contender."""
    return Figure(
        case,
        contender,
        median([s.rate for s in samples]),
        "entries/s",
        note,
        extra={CPU_US: median([s.cpu_us for s in samples])},
    )
