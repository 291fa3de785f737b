"""The customer's name of an order (order.created version 2).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``orders.customer_name`` (nullable: orders before it have none)."""
    with op.batch_alter_table("orders") as batch:
        batch.add_column(sa.Column("customer_name", sa.String(200), nullable=True))


def downgrade() -> None:
    """Drop ``orders.customer_name``."""
    with op.batch_alter_table("orders") as batch:
        batch.drop_column("customer_name")
