"""Orders, outbox, idempotency keys and the relay lease.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types, so later changes to schema.py never change
# what this revision created.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_MONEY = sa.Numeric(12, 2).with_variant(sa.BigInteger(), "sqlite")  # cents on SQLite
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the tables and the one lease row."""
    op.create_table(
        "orders",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("total", _MONEY, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("email_status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("email_status_at", _TIME, nullable=True),
        sa.Column("email_reason", sa.Text(), nullable=True),
        sa.Column("email_message_id", sa.String(998), nullable=True),
        sa.Column("last_published_at", _TIME, nullable=True),
        sa.Column("publish_count", sa.Integer(), nullable=False, server_default="0"),
        sa.CheckConstraint(
            "email_status IN ('pending', 'sent', 'failed')", name="ck_orders_email_status"
        ),
        sa.CheckConstraint("total > 0", name="ck_orders_total_positive"),
    )
    op.create_index("ix_orders_pending_published", "orders", ["email_status", "last_published_at"])
    op.create_table(
        "outbox",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(255), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("order_id", sa.BigInteger(), nullable=True),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("order_id", sa.BigInteger(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    lease = op.create_table(
        "relay_lease",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False, server_default="0"),
    )
    op.bulk_insert(lease, [{"name": "outbox", "holder": None, "expires_at": 0.0}])


def downgrade() -> None:
    """Drop everything this revision created."""
    op.drop_table("relay_lease")
    op.drop_table("idempotency_keys")
    op.drop_table("outbox")
    op.drop_index("ix_orders_pending_published", table_name="orders")
    op.drop_table("orders")
