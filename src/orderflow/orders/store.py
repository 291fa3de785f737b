"""Orders and their outbox: every write here is one transaction, run in a thread.

The order row, its outbox row (the ``order.created`` event, wire format v1) and its
idempotency key commit together or not at all; the relay later publishes the outbox.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from orderflow.bus import Message
from orderflow.bus.message import dumps
from orderflow.orders.database import Database
from orderflow.orders.schema import (
    EMAIL_FAILED,
    EMAIL_PENDING,
    EMAIL_SENT,
    OUTBOX_LEASE,
    idempotency_keys,
    orders,
    outbox,
    relay_lease,
)
from orderflow.orders.validation import OrderRequest

log = logging.getLogger(__name__)

#: CloudEvents source of the events this service publishes.
SOURCE = "orderflow/orders"
ORDER_CREATED = "order.created"
#: PostgreSQL NOTIFY channel that wakes relays in other processes on new outbox rows.
NOTIFY_CHANNEL = "orderflow_outbox"


class OrderConflict(Exception):
    """The order id or idempotency key already belongs to a different request."""


@dataclass(frozen=True, slots=True)
class Order:
    """An order as stored, with its confirmation email status."""

    id: int
    email: str
    total: Decimal
    currency: str
    items: list[dict[str, Any]]
    created_at: datetime
    email_status: str = EMAIL_PENDING
    email_status_at: datetime | None = None
    email_reason: str | None = None
    email_message_id: str | None = None
    last_published_at: datetime | None = None
    publish_count: int = 0

    def event_data(self) -> dict[str, Any]:
        """The ``order.created`` payload of wire format v1."""
        return {
            "id": self.id,
            "email": self.email,
            "total": str(self.total),
            "currency": self.currency,
            "items": self.items,
            "created_at": self.created_at.isoformat(),
        }

    def to_json(self) -> dict[str, Any]:
        """The order as the HTTP API and the CLI show it."""
        return {
            **self.event_data(),
            "email_status": self.email_status,
            "email_status_at": _iso(self.email_status_at),
            "email_reason": self.email_reason,
            "email_message_id": self.email_message_id,
            "last_published_at": _iso(self.last_published_at),
            "publish_count": self.publish_count,
        }

    @classmethod
    def from_row(cls, row: Row[Any]) -> Order:
        """Build from an ``orders`` row."""
        m = row._mapping
        return cls(
            id=int(m["id"]),
            email=m["email"],
            total=m["total"],
            currency=m["currency"],
            items=list(m["items"] or []),
            created_at=m["created_at"],
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

    order: Order
    created: bool


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One event waiting to be published."""

    id: int
    stream: str
    order_id: int | None
    message: Message


@dataclass(slots=True)
class ClaimedBatch:
    """Outbox rows one relay publishes; on PostgreSQL they stay row-locked until done."""

    rows: list[OutboxRow]
    conn: Connection | None = None
    transaction: sa.engine.RootTransaction | None = None
    _closed: bool = field(default=False)


_INSERT_ORDER = sa.insert(orders)
_INSERT_OUTBOX = sa.insert(outbox)
_INSERT_KEY = sa.insert(idempotency_keys)
# PostgreSQL: move the id sequence past an id a client chose.
_BUMP_SEQUENCE = sa.text(
    "SELECT setval(pg_get_serial_sequence('orders', 'id'), "
    "GREATEST(:id, nextval(pg_get_serial_sequence('orders', 'id'))))"
)
#: Most values in one SQL ``IN`` list.
_IN_CHUNK = 500
# One prepared statement for every email outcome (compiled and cache-keyed once, run as
# an executemany); ``sent`` is final, so the guard is in the statement itself.
_SET_EMAIL_STATUS = (
    sa.update(orders)
    .where(orders.c.id == sa.bindparam("o_id"), orders.c.email_status != EMAIL_SENT)
    .values(
        email_status=sa.bindparam("o_status"),
        email_status_at=sa.bindparam("o_at"),
        email_reason=sa.bindparam("o_reason"),
        email_message_id=sa.bindparam("o_message_id"),
    )
)
# The hot path's other statements, built once (an expanding IN list keeps one cached
# compilation for any number of ids): building a statement per call cost more than
# running it.
_IDS: sa.BindParameter[Any] = sa.bindparam("ids", expanding=True)
_KNOWN_KEYS = sa.select(
    idempotency_keys.c.key, idempotency_keys.c.order_id, idempotency_keys.c.fingerprint
).where(idempotency_keys.c.key.in_(sa.bindparam("keys", expanding=True)))
_KNOWN_IDS = sa.select(orders.c.id, orders.c.fingerprint).where(orders.c.id.in_(_IDS))
_ORDERS_BY_ID = sa.select(orders).where(orders.c.id.in_(_IDS))
_EMAIL_STATUSES = sa.select(orders.c.id, orders.c.email_status).where(orders.c.id.in_(_IDS))
_CLAIM = sa.select(outbox).order_by(outbox.c.id).limit(sa.bindparam("limit"))
_DELETE_PUBLISHED = sa.delete(outbox).where(outbox.c.id.in_(_IDS))
_MARK_PUBLISHED = (
    sa.update(orders)
    .where(orders.c.id.in_(_IDS))
    .values(
        last_published_at=sa.bindparam("published_at"),
        publish_count=orders.c.publish_count + 1,
    )
)
#: One lock per SQLite database: the process's writers (group commit, relay, email
#: status) take turns here instead of in SQLite's busy handler, which sleeps 1 to 100 ms
#: between tries. Other processes still meet the busy handler.
_SQLITE_WRITE_LOCKS: weakref.WeakKeyDictionary[Database, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_LOCKS_LOCK = threading.Lock()


def _sqlite_write_lock(db: Database) -> threading.RLock:
    with _LOCKS_LOCK:
        lock = _SQLITE_WRITE_LOCKS.get(db)
        if lock is None:
            lock = _SQLITE_WRITE_LOCKS[db] = threading.RLock()
        return lock


def _chunks(values: Sequence[Any]) -> list[Sequence[Any]]:
    return [values[i : i + _IN_CHUNK] for i in range(0, len(values), _IN_CHUNK)]


def _key_row(key: str, order_id: int, fingerprint: str, now: datetime) -> dict[str, Any]:
    return {"key": key, "order_id": order_id, "fingerprint": fingerprint, "created_at": now}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _now() -> datetime:
    return datetime.now(UTC)


def order_event(order: Order) -> Message:
    """A fresh ``order.created`` event of ``order`` (a new event id each time)."""
    return Message.event(ORDER_CREATED, order.event_data(), source=SOURCE)


@dataclass(frozen=True, slots=True)
class EmailStatusUpdate:
    """One confirmation outcome to record on an order (``sent`` or ``failed``)."""

    order_id: int
    status: str
    at: datetime
    reason: str | None = None
    message_id: str | None = None


class OrderStore:
    """Reads and writes orders, idempotency keys and the outbox."""

    def __init__(self, db: Database, *, stream: str) -> None:
        self.db = db
        self.stream = stream

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """``db.write()``, on SQLite one thread of this process at a time."""
        if not self.db.is_sqlite:
            with self.db.write() as conn:
                yield conn
            return
        with _sqlite_write_lock(self.db), self.db.write() as conn:
            yield conn

    # -- orders ----------------------------------------------------------------------

    def create(self, request: OrderRequest, *, idempotency_key: str | None = None) -> CreateResult:
        """Create the order and its event in one transaction, or replay an earlier one.

        Raises OrderConflict when the key or the client's id belongs to another request.
        """
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                (result,) = self._create_batch([(request, idempotency_key)])
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
        self, requests: Sequence[tuple[OrderRequest, str | None]]
    ) -> list[CreateResult | OrderConflict]:
        """Create several orders in ONE transaction (group commit); each gets its result
        or its conflict, in order. Equivalent to ``create`` for each, only faster."""
        if len(requests) == 1:
            request, key = requests[0]
            try:
                return [self.create(request, idempotency_key=key)]
            except OrderConflict as exc:
                return [exc]
        keys = [key for _, key in requests if key is not None]
        ids = [request.id for request, _ in requests if request.id is not None]
        bulk = len(set(keys)) == len(keys) and len(set(ids)) == len(ids)
        try:
            # Repeats inside one batch (a client retrying fast) take the plain path.
            return self._create_bulk(requests) if bulk else self._create_batch(requests)
        except sa.exc.IntegrityError:
            # Another process raced us on some key or id: one at a time, with retries.
            results: list[CreateResult | OrderConflict] = []
            for request, key in requests:
                try:
                    results.append(self.create(request, idempotency_key=key))
                except OrderConflict as exc:
                    results.append(exc)
            return results

    def _create_batch(
        self, requests: Sequence[tuple[OrderRequest, str | None]]
    ) -> list[CreateResult | OrderConflict]:
        results: list[CreateResult | OrderConflict] = []
        events: list[tuple[int | None, Message]] = []
        now = _now()
        with self._write() as conn:
            for request, key in requests:
                fingerprint = request.fingerprint()
                try:
                    replay = self._find_replay(conn, request, key, fingerprint)
                except OrderConflict as exc:
                    results.append(exc)
                    continue
                if replay is not None:
                    results.append(CreateResult(replay, created=False))
                    continue
                order = self._insert(conn, request, fingerprint, now)
                if key is not None:
                    self._remember_key(conn, key, order.id, fingerprint, now)
                events.append((order.id, order_event(order)))
                results.append(CreateResult(order, created=True))
            if events:
                self._enqueue(conn, events, now)
        return results

    def _create_bulk(
        self, requests: Sequence[tuple[OrderRequest, str | None]]
    ) -> list[CreateResult | OrderConflict]:
        """``_create_batch`` with set-wise SQL: a few statements for the whole batch.

        Needs the batch's keys and client ids to be distinct from each other.
        """
        now = _now()
        fingerprints = [request.fingerprint() for request, _ in requests]
        keys = [key for _, key in requests if key is not None]
        client_ids = [request.id for request, _ in requests if request.id is not None]
        results: list[CreateResult | OrderConflict | int | None] = [None] * len(requests)
        with self._write() as conn:
            known_keys = {
                row.key: (int(row.order_id), row.fingerprint)
                for chunk in _chunks(keys)
                for row in conn.execute(_KNOWN_KEYS, {"keys": chunk})
            }
            known_ids = {
                int(row.id): row.fingerprint
                for chunk in _chunks(client_ids)
                for row in conn.execute(_KNOWN_IDS, {"ids": chunk})
            }
            new_keys: list[dict[str, Any]] = []
            to_insert: list[int] = []
            for i, (request, key) in enumerate(requests):
                fingerprint = fingerprints[i]
                if key is not None and key in known_keys:
                    order_id, key_fingerprint = known_keys[key]
                    results[i] = (
                        order_id
                        if key_fingerprint == fingerprint
                        else OrderConflict(
                            "Idempotency-Key was already used for a different request"
                        )
                    )
                elif request.id is not None and request.id in known_ids:
                    if known_ids[request.id] != fingerprint:
                        results[i] = OrderConflict(
                            f"order {request.id} already exists with different details"
                        )
                        continue
                    results[i] = request.id
                    if key is not None:
                        new_keys.append(_key_row(key, request.id, fingerprint, now))
                else:
                    to_insert.append(i)
            created = self._insert_many(
                conn, [requests[i][0] for i in to_insert], fingerprints, to_insert, now
            )
            for i, order in zip(to_insert, created, strict=True):
                results[i] = CreateResult(order, created=True)
                key = requests[i][1]
                if key is not None:
                    new_keys.append(_key_row(key, order.id, fingerprints[i], now))
            if new_keys:
                conn.execute(_INSERT_KEY, new_keys)
            if created:
                self._enqueue(conn, [(order.id, order_event(order)) for order in created], now)
            replay_ids = sorted({r for r in results if isinstance(r, int)})
            replayed = {
                order.id: order
                for chunk in _chunks(replay_ids)
                for order in (
                    Order.from_row(row) for row in conn.execute(_ORDERS_BY_ID, {"ids": chunk})
                )
            }
        final: list[CreateResult | OrderConflict] = []
        for result in results:
            if isinstance(result, int):
                final.append(CreateResult(replayed[result], created=False))
            else:
                assert result is not None
                final.append(result)
        return final

    def _insert_many(
        self,
        conn: Connection,
        requests: list[OrderRequest],
        fingerprints: list[str],
        positions: list[int],
        now: datetime,
    ) -> list[Order]:
        rows: list[dict[str, Any]] = [
            {
                "email": request.email,
                "total": request.total,
                "currency": request.currency,
                "items": [item.wire() for item in request.items],
                "created_at": now,
                "fingerprint": fingerprints[position],
                "email_status": EMAIL_PENDING,
                "publish_count": 0,
            }
            for request, position in zip(requests, positions, strict=True)
        ]
        assigned = [row for row, request in zip(rows, requests, strict=True) if request.id is None]
        chosen = []
        for row, request in zip(rows, requests, strict=True):
            if request.id is not None:
                row["id"] = request.id
                chosen.append(row)
        if assigned:
            # One multi-row INSERT … RETURNING, ids in the order of the rows.
            ids = (
                conn.execute(
                    _INSERT_ORDER.returning(orders.c.id, sort_by_parameter_order=True), assigned
                )
                .scalars()
                .all()
            )
            for row, order_id in zip(assigned, ids, strict=True):
                row["id"] = int(order_id)
        if chosen:
            conn.execute(_INSERT_ORDER, chosen)
            if not self.db.is_sqlite:
                conn.execute(_BUMP_SEQUENCE, {"id": max(row["id"] for row in chosen)})
        return [
            Order(
                id=row["id"],
                email=row["email"],
                total=row["total"],
                currency=row["currency"],
                items=row["items"],
                created_at=now,
            )
            for row in rows
        ]

    def _find_replay(
        self,
        conn: Connection,
        request: OrderRequest,
        key: str | None,
        fingerprint: str,
    ) -> Order | None:
        if key is not None:
            row = conn.execute(
                sa.select(idempotency_keys).where(idempotency_keys.c.key == key)
            ).first()
            if row is not None:
                if row.fingerprint != fingerprint:
                    raise OrderConflict("Idempotency-Key was already used for a different request")
                order = self._get(conn, int(row.order_id))
                if order is None:  # pragma: no cover - orders are never deleted
                    raise OrderConflict("Idempotency-Key refers to a missing order")
                return order
        if request.id is None:
            return None
        existing = conn.execute(
            sa.select(orders.c.fingerprint).where(orders.c.id == request.id)
        ).first()
        if existing is None:
            return None
        if existing.fingerprint != fingerprint:
            raise OrderConflict(f"order {request.id} already exists with different details")
        if key is not None:
            self._remember_key(conn, key, request.id, fingerprint)
        return self._get(conn, request.id)

    def _insert(
        self, conn: Connection, request: OrderRequest, fingerprint: str, created_at: datetime
    ) -> Order:
        items = [item.wire() for item in request.items]
        values: dict[str, Any] = {
            "email": request.email,
            "total": request.total,
            "currency": request.currency,
            "items": items,
            "created_at": created_at,
            "fingerprint": fingerprint,
            "email_status": EMAIL_PENDING,
            "publish_count": 0,
        }
        if request.id is not None:
            values["id"] = request.id
        # A prepared statement with bound values: compiled once, cached by SQLAlchemy.
        result = conn.execute(_INSERT_ORDER, values)
        primary_key = result.inserted_primary_key
        assert primary_key is not None
        order_id = int(primary_key[0])
        if request.id is not None and not self.db.is_sqlite:
            # Keep the sequence ahead of ids clients chose, so assigned ids avoid them.
            conn.execute(_BUMP_SEQUENCE, {"id": order_id})
        return Order(
            id=order_id,
            email=request.email,
            total=request.total,
            currency=request.currency,
            items=items,
            created_at=created_at,
        )

    def _remember_key(
        self,
        conn: Connection,
        key: str,
        order_id: int,
        fingerprint: str,
        now: datetime | None = None,
    ) -> None:
        conn.execute(
            _INSERT_KEY,
            {
                "key": key,
                "order_id": order_id,
                "fingerprint": fingerprint,
                "created_at": now or _now(),
            },
        )

    def _enqueue(
        self, conn: Connection, events: Sequence[tuple[int | None, Message]], now: datetime
    ) -> None:
        conn.execute(
            _INSERT_OUTBOX,
            [
                {
                    "stream": self.stream,
                    "event_id": message.id,
                    "order_id": order_id,
                    "headers": orjson.dumps(dict(message.headers)).decode(),
                    "data": dumps(message.data).decode(),
                    "created_at": now,
                }
                for order_id, message in events
            ],
        )
        if not self.db.is_sqlite:
            # Delivered at commit: relays in other processes wake at once.
            conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def get(self, order_id: int) -> Order | None:
        """The order with this id, or None."""
        with self.db.read() as conn:
            return self._get(conn, order_id)

    @staticmethod
    def _get(conn: Connection, order_id: int) -> Order | None:
        row = conn.execute(sa.select(orders).where(orders.c.id == order_id)).first()
        return Order.from_row(row) if row is not None else None

    def set_email_status(
        self,
        order_id: int,
        status: str,
        *,
        at: datetime,
        reason: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Record a confirmation outcome; ``sent`` is final and never regresses.

        Returns ``updated``, ``unchanged`` (already sent) or ``unknown`` (no such order).
        """
        update = EmailStatusUpdate(order_id, status, at, reason, message_id)
        (outcome,) = self.set_email_statuses([update])
        return outcome

    def set_email_statuses(self, updates: Sequence[EmailStatusUpdate]) -> list[str]:
        """Record several outcomes, in order, in ONE transaction; each gets the outcome
        ``set_email_status`` would have given it, applied one after another."""
        for update in updates:
            if update.status not in (EMAIL_SENT, EMAIL_FAILED):
                raise ValueError(f"email status must be sent or failed, not {update.status!r}")
        if not updates:
            return []
        ids = sorted({update.order_id for update in updates})
        outcomes: list[str] = []
        rows: list[dict[str, Any]] = []
        with self._write() as conn:
            # The current status of each order first: it decides every outcome, so one
            # executemany then writes only the updates that change something.
            query = _EMAIL_STATUSES
            if not self.db.is_sqlite:
                # Concurrent writers in other processes: keep the outcomes exact.
                query = query.with_for_update()
            current: dict[int, str] = {
                int(row.id): row.email_status
                for chunk in _chunks(ids)
                for row in conn.execute(query, {"ids": chunk})
            }
            for update in updates:
                status = current.get(update.order_id)
                if status is None:
                    outcomes.append("unknown")
                elif status == EMAIL_SENT:
                    outcomes.append("unchanged")
                else:
                    outcomes.append("updated")
                    current[update.order_id] = update.status
                    rows.append(
                        {
                            "o_id": update.order_id,
                            "o_status": update.status,
                            "o_at": update.at,
                            "o_reason": update.reason,
                            "o_message_id": update.message_id,
                        }
                    )
            if rows:
                conn.execute(_SET_EMAIL_STATUS, rows)
        return outcomes

    def republish_due(
        self, *, older_than_s: float, now: datetime | None = None, limit: int = 500
    ) -> list[int]:
        """Queue a new event for each order still pending ``older_than_s`` after its last
        publish; returns their ids. The order's ``last_published_at`` is cleared until
        the relay has published again, so it is not queued twice meanwhile."""
        now = now or _now()
        cutoff = now - timedelta(seconds=older_than_s)
        with self._write() as conn:
            query = (
                sa.select(orders)
                .where(
                    orders.c.email_status == EMAIL_PENDING,
                    orders.c.last_published_at.is_not(None),
                    orders.c.last_published_at <= cutoff,
                )
                .order_by(orders.c.id)
                .limit(limit)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            due = [Order.from_row(row) for row in conn.execute(query)]
            if not due:
                return []
            ids = [order.id for order in due]
            self._enqueue(conn, [(order.id, order_event(order)) for order in due], now)
            conn.execute(
                sa.update(orders).where(orders.c.id.in_(ids)).values(last_published_at=None)
            )
            return ids

    # -- outbox ----------------------------------------------------------------------

    def backlog(self) -> int:
        """Events waiting in the outbox."""
        with self.db.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one())

    def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or renew the SQLite relay lease; True if ``holder`` has it now."""
        now = time.time()
        with self._write() as conn:
            result = conn.execute(
                sa.update(relay_lease)
                .where(
                    relay_lease.c.name == OUTBOX_LEASE,
                    sa.or_(
                        relay_lease.c.holder == holder,
                        relay_lease.c.holder.is_(None),
                        relay_lease.c.expires_at < now,
                    ),
                )
                .values(holder=holder, expires_at=now + ttl_s)
            )
            return bool(result.rowcount)

    def release_lease(self, holder: str) -> None:
        """Give the lease up at once (another relay need not wait for it to expire)."""
        with self._write() as conn:
            conn.execute(
                sa.update(relay_lease)
                .where(relay_lease.c.name == OUTBOX_LEASE, relay_lease.c.holder == holder)
                .values(holder=None, expires_at=0.0)
            )

    def claim(self, limit: int) -> ClaimedBatch:
        """The oldest pending events, at most ``limit``.

        On PostgreSQL they are locked (``FOR UPDATE SKIP LOCKED``) until ``complete`` or
        ``abandon``, so concurrent relays take disjoint batches. On SQLite the caller
        holds the relay lease instead.
        """
        if self.db.is_sqlite:
            with self.db.read() as conn:
                return ClaimedBatch(
                    rows=[_outbox_row(r) for r in conn.execute(_CLAIM, {"limit": limit})]
                )
        conn = self.db.engine.connect()
        try:
            transaction = conn.begin()
            query = _CLAIM.with_for_update(skip_locked=True)
            rows = [_outbox_row(r) for r in conn.execute(query, {"limit": limit})]
        except BaseException:
            conn.close()
            raise
        if not rows:
            transaction.rollback()
            conn.close()
            return ClaimedBatch(rows=[])
        return ClaimedBatch(rows=rows, conn=conn, transaction=transaction)

    def complete(self, batch: ClaimedBatch) -> None:
        """Remove published events and stamp their orders' publish time."""
        if batch._closed or not batch.rows:
            return
        batch._closed = True
        ids = [row.id for row in batch.rows]
        order_ids = sorted({row.order_id for row in batch.rows if row.order_id is not None})
        if batch.conn is not None:
            try:
                self._mark(batch.conn, ids, order_ids)
                assert batch.transaction is not None
                batch.transaction.commit()
            finally:
                batch.conn.close()
            return
        with self._write() as conn:
            self._mark(conn, ids, order_ids)

    @staticmethod
    def _mark(conn: Connection, ids: list[int], order_ids: list[int]) -> None:
        now = _now()
        conn.execute(_DELETE_PUBLISHED, {"ids": ids})
        if order_ids:
            conn.execute(_MARK_PUBLISHED, {"ids": order_ids, "published_at": now})

    def abandon(self, batch: ClaimedBatch) -> None:
        """Leave the events pending (unlocking them on PostgreSQL)."""
        if batch._closed:
            return
        batch._closed = True
        if batch.conn is not None:
            try:
                if batch.transaction is not None and batch.transaction.is_active:
                    batch.transaction.rollback()
            finally:
                batch.conn.close()


def _outbox_row(row: Row[Any]) -> OutboxRow:
    m = row._mapping
    message = Message(
        data=orjson.loads(m["data"]), headers=orjson.loads(m["headers"]), id=m["event_id"]
    )
    order_id = m["order_id"]
    return OutboxRow(
        id=int(m["id"]),
        stream=m["stream"],
        order_id=int(order_id) if order_id is not None else None,
        message=message,
    )
