"""Alembic environment: runs on the connection ``Database.migrate()`` hands over."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from orderflow.orders.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    # Run from the alembic command line: a URL in the config, a connection of our own.
    engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as own:
        context.configure(connection=own, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        own.commit()
    engine.dispose()
else:
    # SQLite can only ALTER tables by copying them: batch mode does that.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
