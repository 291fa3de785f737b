"""Consuming streams: one engine (read, claim, retry, dead-letter, ack, heartbeat), and
the consumer modes as policies over it.

- :class:`StreamWorker`: competing consumers of one stream (``competing``).
- :class:`SupervisedStreamWorker`: the same, starting again after a failure (``supervised``).
- :class:`PartitionedWorker`: competing consumers on every partition (``partitioned``).
- :class:`OrderedWorker`: one leaseholder per partition, in order (``ordered``).
"""

from orderflow.bus.consume.competing import StreamWorker
from orderflow.bus.consume.config import ConsumerSettings, WorkerConfig, WorkerStats
from orderflow.bus.consume.engine import Engine
from orderflow.bus.consume.ordered import OrderedWorker
from orderflow.bus.consume.partitioned import PartitionedWorker
from orderflow.bus.consume.policy import COMPETING, ORDERED, Policy
from orderflow.bus.consume.supervised import SupervisedStreamWorker

__all__ = [
    "COMPETING",
    "ORDERED",
    "ConsumerSettings",
    "Engine",
    "OrderedWorker",
    "PartitionedWorker",
    "Policy",
    "StreamWorker",
    "SupervisedStreamWorker",
    "WorkerConfig",
    "WorkerStats",
]
