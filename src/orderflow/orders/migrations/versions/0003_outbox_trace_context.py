"""The outbox keeps each event's W3C trace context (tracing, issue 16).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the nullable ``outbox.trace_context`` (rows written before it have none)."""
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("trace_context", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``outbox.trace_context``."""
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("trace_context")
