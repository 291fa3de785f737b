"""The SQLite write path: one connection shared by the process's writers, kept open,
and replaced after a failed transaction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from orderflow.orders import Database


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path}/orders.db")
    database.migrate()
    yield database
    database.close()


def test_writes_share_one_open_connection_and_a_failed_one_is_replaced(db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
        first = conn
    with db.write() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        assert conn is first  # no checkout and return per transaction
        assert not conn.closed

    def taken() -> None:
        with db.write() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (2)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))

    with pytest.raises(sa.exc.IntegrityError):
        taken()
    assert first.closed  # given back to the pool (which resets it)
    with db.write() as conn:
        assert conn is not first  # a fresh one after the failure
        conn.execute(sa.text("INSERT INTO t VALUES (3)"))
    with db.read() as conn:
        # The failed transaction left nothing; the others committed.
        assert conn.execute(sa.text("SELECT n FROM t ORDER BY n")).scalars().all() == [1, 3]


def test_a_write_inside_a_write_of_the_same_thread_is_refused(db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
    with db.write() as outer:
        outer.execute(sa.text("INSERT INTO t VALUES (1)"))
        with pytest.raises(RuntimeError, match="inside another"), db.write():
            pass
        outer.execute(sa.text("INSERT INTO t VALUES (2)"))
    with db.read() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar_one() == 2


def test_close_closes_the_shared_connection(db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.text("CREATE TABLE t (n INTEGER)"))
        shared = conn
    db.close()
    assert shared.closed
    with db.write() as conn:  # usable again: a new engine and connection
        conn.execute(sa.text("INSERT INTO t VALUES (1)"))
