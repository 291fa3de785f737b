"""The event bus over Redis: Streams (consumer groups, at-least-once) and Pub/Sub.

It knows nothing of orders or email: a message is an id, string headers and a JSON
object payload, carried in wire format v1 (see ``orderflow.bus.message``).
"""

from orderflow.bus.connection import connect, redact_url
from orderflow.bus.consume import (
    OrderedWorker,
    PartitionedWorker,
    StreamWorker,
    SupervisedStreamWorker,
    WorkerConfig,
    WorkerStats,
)
from orderflow.bus.delivery import Delivery, Handler
from orderflow.bus.errors import TRANSIENT, PermanentError, is_nogroup
from orderflow.bus.guarantees import PUBSUB, STREAMS, Guarantees
from orderflow.bus.keys import StreamKeys
from orderflow.bus.message import DecodeError, Message, decode, encode
from orderflow.bus.pubsub import PubSubPublisher, PubSubSubscriber
from orderflow.bus.streams import Retention, StreamPublisher, TrimResult, ensure_group

__all__ = [
    "PUBSUB",
    "STREAMS",
    "TRANSIENT",
    "DecodeError",
    "Delivery",
    "Guarantees",
    "Handler",
    "Message",
    "OrderedWorker",
    "PartitionedWorker",
    "PermanentError",
    "PubSubPublisher",
    "PubSubSubscriber",
    "Retention",
    "StreamKeys",
    "StreamPublisher",
    "StreamWorker",
    "SupervisedStreamWorker",
    "TrimResult",
    "WorkerConfig",
    "WorkerStats",
    "connect",
    "decode",
    "encode",
    "ensure_group",
    "is_nogroup",
    "redact_url",
]
