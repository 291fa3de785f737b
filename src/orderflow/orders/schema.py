"""The Order Service's tables (SQLAlchemy Core), shared by the store and the migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

#: An order's ``email_status``: its confirmation email is pending, sent (final) or failed.
EMAIL_STATUS_PENDING = "pending"
EMAIL_STATUS_SENT = "sent"
EMAIL_STATUS_FAILED = "failed"

#: The one lease row the SQLite relays compete for.
OUTBOX_LEASE = "outbox"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zones: values are stored as naive UTC and given ``UTC`` back on
    read, so comparisons in SQL stay correct and Python always sees aware datetimes.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC (naive on SQLite)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Money(sa.TypeDecorator[Decimal]):
    """An exact amount with two decimals: ``NUMERIC(12, 2)``, integer cents on SQLite.

    SQLite has no decimal type (it would store a float), so the amount is kept exact
    as a count of cents there.
    """

    impl = sa.Numeric(12, 2, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        """Cents as an integer on SQLite, NUMERIC(12, 2) elsewhere."""
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.Numeric(12, 2, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        """Cents on SQLite; the decimal itself elsewhere."""
        if value is None:
            return None
        if dialect.name == "sqlite":
            return int(value.scaleb(2).to_integral_exact())
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        """Always a Decimal with two places."""
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-2)
        return Decimal(value).quantize(Decimal("0.01"))


#: A 64-bit id that is still SQLite's auto-assigned rowid alias there.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(320), nullable=False),
    # The customer's name, when the order gave one (a version 2 body's customer.name).
    sa.Column("customer_name", sa.String(200), nullable=True),
    sa.Column("total", Money(), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("items", sa.JSON(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    # sha256 of the validated request: replays with the same body are recognised.
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("email_status", sa.String(16), nullable=False, server_default=EMAIL_STATUS_PENDING),
    sa.Column("email_status_at", UTCDateTime(), nullable=True),
    sa.Column("email_reason", sa.Text(), nullable=True),
    sa.Column("email_message_id", sa.String(998), nullable=True),
    # When the relay last put the order's event on the stream; NULL while it waits
    # in the outbox. Reconciliation republishes pending orders old enough by it.
    sa.Column("last_published_at", UTCDateTime(), nullable=True),
    sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("stream", sa.String(255), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("order_id", sa.BigInteger(), nullable=True),
    # Wire format v1: the CloudEvents headers and the JSON payload, as published.
    sa.Column("headers", sa.Text(), nullable=False),
    sa.Column("data", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    # The W3C trace context (JSON: traceparent, tracestate) of the request that made
    # the event, when tracing was on; the relay's span continues it (migration 0002).
    sa.Column("trace_context", sa.Text(), nullable=True),
    sqlite_autoincrement=True,
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("order_id", sa.BigInteger(), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

relay_lease = sa.Table(
    "relay_lease",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=True),
    sa.Column("expires_at", sa.Float(), nullable=False, server_default="0"),
)

sa.Index("ix_orders_pending_published", orders.c.email_status, orders.c.last_published_at)
