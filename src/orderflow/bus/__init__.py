"""The event bus over Redis: Streams (consumer groups, at-least-once) and Pub/Sub.

It knows nothing of orders or email: a message is an id, string headers and a JSON
object payload, carried in wire format v1 (see ``orderflow.bus.message``).
"""

from orderflow.bus.connection import connect, redact_url
from orderflow.bus.guarantees import PUBSUB, STREAMS, Guarantees
from orderflow.bus.keys import StreamKeys
from orderflow.bus.message import DecodeError, Message, decode, encode
from orderflow.bus.pubsub import PubSubPublisher, PubSubSubscriber
from orderflow.bus.streams import Retention, StreamPublisher, TrimResult, ensure_group
from orderflow.bus.worker import (
    Delivery,
    Handler,
    PermanentError,
    StreamWorker,
    WorkerConfig,
    WorkerStats,
)

__all__ = [
    "PUBSUB",
    "STREAMS",
    "DecodeError",
    "Delivery",
    "Guarantees",
    "Handler",
    "Message",
    "PermanentError",
    "PubSubPublisher",
    "PubSubSubscriber",
    "Retention",
    "StreamKeys",
    "StreamPublisher",
    "StreamWorker",
    "TrimResult",
    "WorkerConfig",
    "WorkerStats",
    "connect",
    "decode",
    "encode",
    "ensure_group",
    "redact_url",
]
