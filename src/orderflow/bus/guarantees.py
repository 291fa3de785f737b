"""What a transport promises, declared so one behavioural test suite can check each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Guarantees:
    """The delivery guarantees of a transport."""

    #: A message published while no consumer runs is delivered when one starts.
    persistent: bool
    #: Consumers of one group share the messages; each is handled by one of them.
    consumer_groups: bool
    #: A failed or interrupted delivery is delivered again (at-least-once).
    redelivery: bool
    #: Messages reach a single consumer in the order they were published.
    ordered: bool


#: Redis Streams with consumer groups: persistent and at-least-once.
STREAMS = Guarantees(persistent=True, consumer_groups=True, redelivery=True, ordered=True)
#: Redis Pub/Sub: fire and forget, at-most-once, every subscriber gets every message.
PUBSUB = Guarantees(persistent=False, consumer_groups=False, redelivery=False, ordered=True)
