"""What a handler is given: one delivery of a message, and the handler's type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orderflow.bus.message import Message

__all__ = ["Delivery", "Handler", "make_delivery"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a message to a handler."""

    message: Message
    entry_id: str
    stream: str
    #: 1 on the first delivery; Redis's count, so it survives restarts and new owners.
    deliveries: int = 1


Handler = Callable[[Delivery], Awaitable[None]]

_new = object.__new__
_set_message: Callable[[Delivery, Message], None] = Delivery.__dict__["message"].__set__
_set_entry_id: Callable[[Delivery, str], None] = Delivery.__dict__["entry_id"].__set__
_set_stream: Callable[[Delivery, str], None] = Delivery.__dict__["stream"].__set__
_set_deliveries: Callable[[Delivery, int], None] = Delivery.__dict__["deliveries"].__set__


def make_delivery(message: Message, entry_id: str, stream: str, deliveries: int) -> Delivery:
    """``Delivery(...)`` without the frozen dataclass's generic setattr: a third of the cost."""
    delivery: Delivery = _new(Delivery)
    _set_message(delivery, message)
    _set_entry_id(delivery, entry_id)
    _set_stream(delivery, stream)
    _set_deliveries(delivery, deliveries)
    return delivery
