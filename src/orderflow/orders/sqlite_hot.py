"""The group commit's hot statements on SQLite, through the DBAPI cursor of the
transaction's own connection (``sqlite3``), not SQLAlchemy's per-statement execution.

SQLAlchemy's execute (compiled-cache lookup, parameter processing, result set-up,
events) cost several times what SQLite itself does for these small statements: at a
few hundred orders per second every order is its own transaction, and the statements
were most of the API's CPU per order. The transaction itself (``BEGIN IMMEDIATE``, the
write lock, commit or rollback) stays SQLAlchemy's (``Database.write``); only the
statements that every order runs are here, with the column types' conversions done
as SQLAlchemy's SQLite types do them (``tests/orders/test_sqlite_hot.py`` compares the
stored rows). Errors are raised as SQLAlchemy's, as from any other statement.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from orderflow.orders.schema import orders

_INSERT_ORDER = (
    "INSERT INTO orders (id, email, customer_name, total, currency, items, created_at, "
    "fingerprint, email_status, publish_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_OUTBOX = (
    "INSERT INTO outbox (stream, event_id, order_id, headers, data, created_at, "
    "trace_context) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_OUTBOX_COLUMNS = ("stream", "event_id", "order_id", "headers", "data", "created_at")

# The columns' own conversions to what SQLite stores (public ``TypeEngine.bind_processor``),
# taken once: the hot path calls them instead of restating what the types do.
_SQLITE = sqlite.dialect()


def _bind(column: sa.Column[Any]) -> Callable[[Any], Any]:
    """What ``column``'s type, as the SQLite dialect adapts it, binds a value to."""
    return column.type.dialect_impl(_SQLITE).bind_processor(_SQLITE) or (lambda v: v)


_TIME = _bind(orders.c.created_at)
_CENTS = _bind(orders.c.total)


def cursor(conn: Connection) -> Any:
    """A DBAPI cursor on ``conn``'s connection, inside its transaction."""
    return conn.connection.cursor()


@contextlib.contextmanager
def translated(statement: str) -> Iterator[None]:
    """``sqlite3``'s errors as SQLAlchemy raises them (IntegrityError, OperationalError
    ...), so callers handle one family of errors whichever way a statement ran."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise sa.exc.IntegrityError(statement, None, exc) from exc
    except sqlite3.OperationalError as exc:
        raise sa.exc.OperationalError(statement, None, exc) from exc
    except sqlite3.Error as exc:
        raise sa.exc.DatabaseError(statement, None, exc) from exc


def time_text(value: datetime) -> str:
    """A UTC time as ``UTCDateTime`` stores it on SQLite (the column type's own bind
    processing: naive UTC, SQLAlchemy's SQLite ``DATETIME`` text)."""
    return str(_TIME(value))


class _Times(dict[datetime, str]):
    """``time_text`` of each time once: a batch's rows share their creation time."""

    def __missing__(self, value: datetime) -> str:
        text = self[value] = time_text(value)
        return text


def cents(value: Decimal) -> int:
    """An amount as ``Money`` stores it on SQLite (the column type's own bind
    processing: whole cents)."""
    return int(_CENTS(value))


def known_ids(cur: Any, ids: Sequence[int]) -> dict[int, str]:
    """Order id -> fingerprint, for those of ``ids`` stored (at most ``IN_CHUNK``)."""
    marks = ", ".join("?" * len(ids))  # placeholders only: the ids are bound
    statement = f"SELECT id, fingerprint FROM orders WHERE id IN ({marks})"  # noqa: S608
    with translated(statement):
        return {int(row[0]): str(row[1]) for row in cur.execute(statement, tuple(ids))}


def insert_orders(cur: Any, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (the ``orders`` columns, Python values) in order; a row without
    ``id`` gets the one SQLite assigns, set in it."""
    times = _Times()
    with translated(_INSERT_ORDER):
        for row in rows:
            cur.execute(
                _INSERT_ORDER,
                (
                    row.get("id"),
                    row["email"],
                    row["customer_name"],
                    cents(row["total"]),
                    row["currency"],
                    orjson.dumps(row["items"]).decode(),
                    times[row["created_at"]],
                    row["fingerprint"],
                    row["email_status"],
                    row["publish_count"],
                ),
            )
            if row.get("id") is None:
                row["id"] = int(cur.lastrowid)


def insert_outbox(cur: Any, params: list[dict[str, Any]]) -> list[int]:
    """Insert outbox rows (the ``outbox`` columns, as ``Outbox.enqueue`` builds them)
    in order; their ids."""
    ids: list[int] = []
    times = _Times()
    with translated(_INSERT_OUTBOX):
        for p in params:
            values = [p[column] for column in _OUTBOX_COLUMNS]
            values[5] = times[values[5]]
            cur.execute(_INSERT_OUTBOX, (*values, p["trace_context"]))
            ids.append(int(cur.lastrowid))
    return ids
