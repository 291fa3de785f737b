"""Orders and their idempotency keys; every write is one transaction, run in a thread.

The order row, its outbox row (the ``order.created`` event, in the version the
service publishes) and its
idempotency key commit together or not at all; the relay later publishes the outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from orderflow import tracing
from orderflow.orders import sqlite_hot
from orderflow.orders.database import Database, in_chunks
from orderflow.orders.events import (
    ORDER_EVENT_VERSIONS,
    SOURCE,
    event_payload,
    lab_message,
    order_event,
)
from orderflow.orders.outbox import Outbox, OutboxRow
from orderflow.orders.schema import EMAIL_STATUS_PENDING, idempotency_keys, orders
from orderflow.orders.validation import OrderRequest

log = logging.getLogger(__name__)

__all__ = [
    "ORDER_EVENT_VERSIONS",
    "SOURCE",
    "CreateResult",
    "OrderConflict",
    "OrderRepository",
    "StoredOrder",
    "lab_message",
    "order_event",
]


class OrderConflict(Exception):
    """The order id or idempotency key already belongs to a different request."""


@dataclass(frozen=True, slots=True)
class StoredOrder:
    """An order as stored, with its confirmation email status."""

    id: int
    email: str
    total: Decimal
    currency: str
    items: list[dict[str, Any]]
    created_at: datetime
    customer_name: str | None = None
    email_status: str = EMAIL_STATUS_PENDING
    email_status_at: datetime | None = None
    email_reason: str | None = None
    email_message_id: str | None = None
    last_published_at: datetime | None = None
    publish_count: int = 0

    def event_data(self, version: int = 1) -> dict[str, Any]:
        """The ``order.created`` payload of ``version`` (1 or 2)."""
        return event_payload(self, version)

    def to_json(self) -> dict[str, Any]:
        """The order as the HTTP API, the console and the CLI show it."""
        return {
            "id": self.id,
            "email": self.email,
            "total": str(self.total),
            "currency": self.currency,
            "items": self.items,
            "created_at": self.created_at.isoformat(),
            "customer_name": self.customer_name,
            "email_status": self.email_status,
            "email_status_at": _iso(self.email_status_at),
            "email_reason": self.email_reason,
            "email_message_id": self.email_message_id,
            "last_published_at": _iso(self.last_published_at),
            "publish_count": self.publish_count,
        }

    @classmethod
    def from_row(cls, row: Row[Any]) -> StoredOrder:
        """Build from an ``orders`` row."""
        m = row._mapping
        return cls(
            id=int(m["id"]),
            email=m["email"],
            total=m["total"],
            currency=m["currency"],
            items=list(m["items"] or []),
            created_at=m["created_at"],
            customer_name=m["customer_name"],
            email_status=m["email_status"],
            email_status_at=m["email_status_at"],
            email_reason=m["email_reason"],
            email_message_id=m["email_message_id"],
            last_published_at=m["last_published_at"],
            publish_count=int(m["publish_count"]),
        )


@dataclass(frozen=True, slots=True)
class CreateResult:
    """The order, and whether this call created it (False: a replay of the same request)."""

    order: StoredOrder
    created: bool


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


_KEY_REUSED = "Idempotency-Key was already used for a different request"
_KEY_ORPHANED = "Idempotency-Key refers to a missing order"


def _id_taken(order_id: int) -> str:
    return f"order {order_id} already exists with different details"


_INSERT_ORDER = sa.insert(orders)
# One multi-row INSERT … RETURNING, ids in the order of the rows.
_INSERT_ORDER_RETURNING_ID = _INSERT_ORDER.returning(orders.c.id, sort_by_parameter_order=True)
_INSERT_KEY = sa.insert(idempotency_keys)
# PostgreSQL: move the id sequence past an id a client chose.
_BUMP_SEQUENCE = sa.text(
    "SELECT setval(pg_get_serial_sequence('orders', 'id'), "
    "GREATEST(:id, nextval(pg_get_serial_sequence('orders', 'id'))))"
)
# The hot path's statements, built once (an expanding IN list keeps one cached
# compilation for any number of ids): building a statement per call cost more than
# running it.
_IDS: sa.BindParameter[Any] = sa.bindparam("ids", expanding=True)
_KNOWN_KEYS = sa.select(
    idempotency_keys.c.key, idempotency_keys.c.order_id, idempotency_keys.c.fingerprint
).where(idempotency_keys.c.key.in_(sa.bindparam("keys", expanding=True)))
_KNOWN_IDS = sa.select(orders.c.id, orders.c.fingerprint).where(orders.c.id.in_(_IDS))
_ORDERS_BY_ID = sa.select(orders).where(orders.c.id.in_(_IDS))
_ORDER_BY_ID = sa.select(orders).where(orders.c.id == sa.bindparam("id"))
_NEWEST = sa.select(orders).order_by(orders.c.id.desc()).limit(sa.bindparam("limit"))


@dataclass(frozen=True, slots=True)
class _New:
    """An order this batch inserts (its place among them): its id is known once inserted."""

    position: int


#: Which order: one stored before (its id) or one this batch inserts.
_Ref: TypeAlias = int | _New


@dataclass(frozen=True, slots=True)
class _Replay:
    """The request repeats an earlier one: it gets that order back."""

    ref: _Ref


@dataclass(slots=True)
class _Plan:
    """What a batch does, decided from the keys and client ids already stored."""

    #: Per request: created (``_New``), a replay, or a conflict.
    outcomes: list[_New | _Replay | OrderConflict] = field(default_factory=list)
    #: The positions of the requests that insert an order.
    to_insert: list[int] = field(default_factory=list)
    #: Idempotency keys to remember: (key, its order, the request's fingerprint).
    new_keys: list[tuple[str, _Ref, str]] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        requests: Sequence[tuple[OrderRequest, str | None]],
        fingerprints: list[str],
        known_keys: dict[str, tuple[_Ref, str]],
        known_ids: dict[int, str],
    ) -> _Plan:
        """Decide each request in turn, as if the earlier ones were stored already."""
        plan = cls()
        for i, (request, key) in enumerate(requests):
            fingerprint = fingerprints[i]
            if key is not None and key in known_keys:
                earlier, key_fingerprint = known_keys[key]
                same = key_fingerprint == fingerprint
                plan.outcomes.append(_Replay(earlier) if same else OrderConflict(_KEY_REUSED))
                continue
            outcome: _New | _Replay
            if request.id is not None and request.id in known_ids:
                if known_ids[request.id] != fingerprint:
                    plan.outcomes.append(OrderConflict(_id_taken(request.id)))
                    continue
                outcome = _Replay(request.id)
                ref: _Ref = request.id
            else:
                outcome = ref = _New(len(plan.to_insert))
                plan.to_insert.append(i)
                if request.id is not None:
                    known_ids[request.id] = fingerprint
            if key is not None:
                known_keys[key] = (ref, fingerprint)
                plan.new_keys.append((key, ref, fingerprint))
            plan.outcomes.append(outcome)
        return plan

    def replays(self) -> list[_Ref]:
        """The orders replayed, one per replaying request."""
        return [outcome.ref for outcome in self.outcomes if isinstance(outcome, _Replay)]


class OrderRepository:
    """Creates and reads orders; a new order's event joins the outbox in its transaction."""

    def __init__(self, db: Database, *, stream: str, event_version: int = 2) -> None:
        if event_version not in ORDER_EVENT_VERSIONS:
            raise ValueError(
                f"order.created version {event_version} is not one of {ORDER_EVENT_VERSIONS}"
            )
        self.db = db
        self.stream = stream
        #: The ``order.created`` version this repository's events are written in.
        self.event_version = event_version
        self.outbox = Outbox(db, stream=stream)

    def create(
        self,
        request: OrderRequest,
        *,
        idempotency_key: str | None = None,
        added: list[OutboxRow] | None = None,
    ) -> CreateResult:
        """Create the order and its event in one transaction, or replay an earlier one.

        Raises OrderConflict when the key or the client's id belongs to another request.
        With ``added``, the outbox rows committed are appended to it (see ``create_many``).
        """
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                (result,) = self._create_bulk([(request, idempotency_key)], added)
            except sa.exc.IntegrityError:
                # A concurrent request took the same key or id between our check and
                # insert (or a client id got ahead of PostgreSQL's sequence): look again.
                if attempt == attempts:
                    raise
                log.debug("integrity error creating an order; retrying (attempt %d)", attempt)
                continue
            if isinstance(result, OrderConflict):
                raise result
            return result
        raise AssertionError("unreachable")

    def create_many(
        self,
        requests: Sequence[tuple[OrderRequest, str | None]],
        *,
        added: list[OutboxRow] | None = None,
    ) -> list[CreateResult | OrderConflict]:
        """Create several orders in ONE transaction (group commit); each gets its result
        or its conflict, in order. Equivalent to ``create`` for each, only faster.

        With ``added``, the outbox rows of the new orders are appended to it once
        committed, with their ids (the in-process handoff to the relay; SQLite only:
        on PostgreSQL it stays as it is, see ``Outbox.enqueue``).
        """
        if len(requests) == 1:
            request, key = requests[0]
            try:
                return [self.create(request, idempotency_key=key, added=added)]
            except OrderConflict as exc:
                return [exc]
        try:
            return self._create_bulk(requests, added)
        except sa.exc.IntegrityError:
            # Another process raced us on some key or id: one at a time, with retries.
            results: list[CreateResult | OrderConflict] = []
            for request, key in requests:
                try:
                    results.append(self.create(request, idempotency_key=key, added=added))
                except OrderConflict as exc:
                    results.append(exc)
            return results

    def _create_bulk(
        self,
        requests: Sequence[tuple[OrderRequest, str | None]],
        added: list[OutboxRow] | None = None,
    ) -> list[CreateResult | OrderConflict]:
        """Each request created or replayed, as if one after another, by a few set-wise
        statements in ONE transaction (a repeat within the batch replays the first);
        the outbox rows it adds are appended to ``added`` once committed."""
        now = datetime.now(UTC)
        rows_added: list[OutboxRow] | None = [] if added is not None else None
        fingerprints = [request.fingerprint() for request, _ in requests]
        keys = list(dict.fromkeys(key for _, key in requests if key is not None))
        client_ids = list(dict.fromkeys(r.id for r, _ in requests if r.id is not None))
        with self.db.write() as conn:
            known_keys: dict[str, tuple[_Ref, str]] = {
                row.key: (int(row.order_id), row.fingerprint)
                for chunk in in_chunks(keys)
                for row in conn.execute(_KNOWN_KEYS, {"keys": chunk})
            }
            known_ids: dict[int, str] = {}
            for chunk in in_chunks(client_ids):
                if self.db.is_sqlite:
                    known_ids.update(sqlite_hot.known_ids(sqlite_hot.cursor(conn), chunk))
                else:
                    found = conn.execute(_KNOWN_IDS, {"ids": chunk})
                    known_ids.update((int(row.id), str(row.fingerprint)) for row in found)
            plan = _Plan.of(requests, fingerprints, known_keys, known_ids)
            inserted = self._insert(
                conn,
                [requests[i][0] for i in plan.to_insert],
                [fingerprints[i] for i in plan.to_insert],
                now,
            )

            def order_id(ref: _Ref) -> int:
                return inserted[ref.position].id if isinstance(ref, _New) else ref

            if plan.new_keys:
                rows = [
                    {"key": key, "order_id": order_id(ref), "fingerprint": fp, "created_at": now}
                    for key, ref, fp in plan.new_keys
                ]
                conn.execute(_INSERT_KEY, rows)
            if inserted:
                events = [(order.id, order_event(order, self.event_version)) for order in inserted]
                traces = [tracing.request_trace(requests[i][0]) for i in plan.to_insert]
                self.outbox.enqueue(conn, events, now, traces, added=rows_added)
            replay_ids = sorted({order_id(ref) for ref in plan.replays()})
            replayed = {
                order.id: order
                for chunk in in_chunks(replay_ids)
                for order in map(StoredOrder.from_row, conn.execute(_ORDERS_BY_ID, {"ids": chunk}))
            }
        if added is not None and rows_added:
            added += rows_added  # committed: the `with` block above ended without error
        results: list[CreateResult | OrderConflict] = []
        for outcome in plan.outcomes:
            if isinstance(outcome, OrderConflict):
                results.append(outcome)
            elif isinstance(outcome, _New):
                results.append(CreateResult(inserted[outcome.position], created=True))
            elif (order := replayed.get(order_id(outcome.ref))) is not None:
                results.append(CreateResult(order, created=False))
            else:  # pragma: no cover - orders are never deleted
                results.append(OrderConflict(_KEY_ORPHANED))
        return results

    def _insert(
        self,
        conn: Connection,
        requests: list[OrderRequest],
        fingerprints: list[str],
        now: datetime,
    ) -> list[StoredOrder]:
        """Insert the orders (ids chosen by clients or assigned), in the order given."""
        rows: list[dict[str, Any]] = [
            {
                "email": request.email,
                "customer_name": request.customer_name,
                "total": request.total,
                "currency": request.currency,
                "items": [item.wire() for item in request.items],
                "created_at": now,
                "fingerprint": fingerprint,
                "email_status": EMAIL_STATUS_PENDING,
                "publish_count": 0,
            }
            for request, fingerprint in zip(requests, fingerprints, strict=True)
        ]
        assigned = []
        chosen = []
        for row, request in zip(rows, requests, strict=True):
            if request.id is None:
                assigned.append(row)
            else:
                row["id"] = request.id
                chosen.append(row)
        if self.db.is_sqlite:
            # The hot statement, straight to sqlite3 (see sqlite_hot); assigned ids first.
            sqlite_hot.insert_orders(sqlite_hot.cursor(conn), assigned + chosen)
        elif assigned:
            # A prepared statement with bound values: compiled once, cached by SQLAlchemy.
            params = assigned if len(assigned) > 1 else assigned[0]
            ids = conn.execute(_INSERT_ORDER_RETURNING_ID, params).scalars().all()
            for row, order_id in zip(assigned, ids, strict=True):
                row["id"] = int(order_id)
        if chosen and not self.db.is_sqlite:
            conn.execute(_INSERT_ORDER, chosen if len(chosen) > 1 else chosen[0])
            # Keep the sequence ahead of ids clients chose, so assigned ids avoid them.
            conn.execute(_BUMP_SEQUENCE, {"id": max(row["id"] for row in chosen)})
        return [
            StoredOrder(
                id=row["id"],
                email=row["email"],
                total=row["total"],
                currency=row["currency"],
                items=row["items"],
                created_at=now,
                customer_name=row["customer_name"],
            )
            for row in rows
        ]

    def get(self, order_id: int) -> StoredOrder | None:
        """The order with this id, or None."""
        with self.db.read() as conn:
            row = conn.execute(_ORDER_BY_ID, {"id": order_id}).first()
            return StoredOrder.from_row(row) if row is not None else None

    def recent(self, limit: int) -> list[StoredOrder]:
        """The newest ``limit`` orders, newest first."""
        with self.db.read() as conn:
            return [StoredOrder.from_row(row) for row in conn.execute(_NEWEST, {"limit": limit})]
