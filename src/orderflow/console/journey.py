"""An order's journey: its path from the API to the inbox, as a timeline, from what is stored.

No trace backend: the order's row (accepted, published, the status recorded), its
outbox row while it waits, the Email Service's record of each delivery (see
``orderflow.email.journey``) and the order's dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis

from orderflow.bus.admin import DeadLetter, list_dead_letters
from orderflow.email.journey import DEAD_LETTERED, DUPLICATE, RETRIED, SENT, Step, read_journey
from orderflow.orders.journey import OutboxRow, waiting_events
from orderflow.orders.repository import StoredOrder
from orderflow.orders.runtime import OrderRuntime

#: Dead letters read per stream when looking for an order's (the oldest first).
DEAD_LETTERS_SCANNED = 1000


@dataclass(frozen=True, slots=True)
class Event:
    """One point of the timeline."""

    at: datetime | None
    kind: str
    title: str
    detail: str = ""
    #: A link (path) to more: the email in the inbox.
    link: str | None = None
    link_text: str = ""


@dataclass(slots=True)
class Journey:
    """An order and its timeline, oldest first."""

    order: StoredOrder
    events: list[Event] = field(default_factory=list)


def order_id_of(letter: DeadLetter) -> int | None:
    """The order id in a dead letter's payload (``data.id``), if it has one."""
    try:
        data: Any = orjson.loads(letter.fields.get("data", ""))
    except orjson.JSONDecodeError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    if value is None and isinstance(data, dict):
        value = data.get("order_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def entry_time(entry_id: str) -> datetime | None:
    """The time a stream entry id was given (its milliseconds part)."""
    millis = entry_id.partition("-")[0]
    if not millis.isdigit():
        return None
    return datetime.fromtimestamp(int(millis) / 1000, UTC)


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def load_journey(runtime: OrderRuntime, order_id: int, streams: list[str]) -> Journey | None:
    """The order's journey; None when there is no such order."""
    order = await runtime.db.run(runtime.store.get, order_id)
    if order is None:
        return None
    waiting = await runtime.db.run(waiting_events, runtime.db, order_id)
    steps = await read_journey(runtime.redis, order_id)
    letters = await _dead_letters(runtime.redis, order_id, streams)
    return Journey(order, timeline(order, waiting, steps, letters))


async def _dead_letters(
    redis: aioredis.Redis, order_id: int, streams: list[str]
) -> list[DeadLetter]:
    found = []
    for stream in streams:
        page = await list_dead_letters(redis, stream, limit=DEAD_LETTERS_SCANNED)
        found += [letter for letter in page.entries if order_id_of(letter) == order_id]
    return found


def timeline(
    order: StoredOrder,
    waiting: list[OutboxRow],
    steps: list[Step],
    letters: list[DeadLetter],
) -> list[Event]:
    """The order's events, oldest first (pure: the page's logic, tested on its own)."""
    events = [
        Event(order.created_at, "accepted", f"Accepted: order #{order.id}", order.email),
        Event(
            order.created_at,
            "committed",
            "Committed with its outbox row",
            "the order and its order.created event, in one transaction",
        ),
    ]
    for row in waiting:
        events.append(
            Event(
                row.created_at,
                "outbox",
                f"Waiting in the outbox: row {row.id}",
                f"event {row.event_id} for {row.stream}; not published yet",
            )
        )
    # Each entry the order was published as: seen by its deliveries or dead letters.
    entries: dict[str, str] = {}
    for step in steps:
        entries.setdefault(step.entry_id, step.stream)
    for letter in letters:
        if letter.source_id:
            entries.setdefault(letter.source_id, letter.source_stream or "")
    for entry_id, stream in sorted(entries.items(), key=lambda item: _id_key(item[0])):
        events.append(
            Event(entry_time(entry_id), "published", f"Published as entry {entry_id}", stream)
        )
    if order.publish_count > len(entries):
        events.append(
            Event(
                order.last_published_at,
                "published",
                f"Published {order.publish_count} time(s) in all, last at this time",
                "an entry no delivery has reached yet has no id recorded here",
            )
        )
    ended = {(step.entry_id, step.deliveries) for step in steps}
    for step in steps:
        events.append(_delivery(step, ended))
    for letter in letters:
        events.append(
            Event(
                _parse(letter.time) or entry_time(letter.id),
                "dead-letter",
                f"In the dead letters: {letter.id}",
                f"{letter.reason or 'no reason recorded'} ({letter.dead_letter_stream})",
            )
        )
    # The status last: it concludes the journey (its time is the outcome's, which the
    # worker stamps a moment before it records the delivery's step).
    return [*_in_order(events), _status(order)]


def _delivery(step: Step, ended: set[tuple[str, int]]) -> Event:
    title = f"Delivery {step.deliveries} to {step.consumer}"
    detail = ""
    if step.deliveries > 1 and (step.entry_id, step.deliveries - 1) not in ended:
        # The previous delivery of this entry recorded no outcome: its worker died
        # (or stopped) holding it, and this one claimed it after the claim timeout.
        detail = "claimed after a crash: the previous delivery ended without an outcome. "
    if step.outcome == SENT:
        return Event(
            _parse(step.at),
            "sent",
            title + ": accepted by SMTP",
            detail + f"Message-ID {step.message_id}",
            link=f"/inbox/find?message_id={quote(step.message_id, safe='')}"
            if step.message_id
            else None,
            link_text="open email",
        )
    if step.outcome == DUPLICATE:
        return Event(
            _parse(step.at),
            "duplicate",
            title + ": already sent, not sent again",
            detail + f"Message-ID {step.message_id}",
        )
    detail += step.reason or ""
    if step.outcome == RETRIED:
        return Event(_parse(step.at), "retried", title + ": failed, retried", detail)
    if step.outcome == DEAD_LETTERED:
        return Event(_parse(step.at), "dead-lettered", title + ": failed, dead-lettered", detail)
    return Event(_parse(step.at), "delivery", f"{title}: {step.outcome}", detail)


def _status(order: StoredOrder) -> Event:
    status = order.email_status
    if status == "sent":
        detail = f"Message-ID {order.email_message_id}" if order.email_message_id else ""
    elif status == "failed":
        detail = order.email_reason or ""
    else:
        detail = "no outcome recorded on the order yet"
    return Event(order.email_status_at, f"status-{status}", f"Status recorded: {status}", detail)


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return (int(millis) if millis.isdigit() else 0, int(seq) if seq.isdigit() else 0)


def _in_order(events: list[Event]) -> list[Event]:
    """By time (stable: the order built above breaks ties); undated events stay last."""
    dated = [e for e in events if e.at is not None]
    undated = [e for e in events if e.at is None]
    return sorted(dated, key=lambda e: e.at or datetime.min.replace(tzinfo=UTC)) + undated
