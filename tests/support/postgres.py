"""Throw-away PostgreSQL databases on the test server."""

from __future__ import annotations

import uuid

import sqlalchemy as sa


def _as_admin(admin_url: str, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run in a transaction: autocommit.
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(statement))
    finally:
        admin.dispose()


def create_test_database(admin_url: str) -> str:
    """Create an empty PostgreSQL database next to ``admin_url``; returns its URL."""
    name = f"orderflow_test_{uuid.uuid4().hex[:12]}"
    _as_admin(admin_url, f'CREATE DATABASE "{name}"')
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def drop_test_database(admin_url: str, url: str) -> None:
    """Drop a database made by ``create_test_database`` (its sessions closed by force)."""
    name = url.rsplit("/", 1)[1]
    _as_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
