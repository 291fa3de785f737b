"""The SQLite relay lease, rule by rule, on a real SQLite database with the clock held
still (each test kills mutants the two-relay test lets live: see docs/MUTATION.md)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from orderflow.bus import Message
from orderflow.orders import outbox as outbox_module
from orderflow.orders.database import Database
from orderflow.orders.outbox import Outbox
from orderflow.orders.schema import OUTBOX_LEASE, relay_lease

NOW = 1_000_000.0


class Clock:
    """The outbox's ``time.time``, moved by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(outbox_module, "time", SimpleNamespace(time=clock.time))
    return clock


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    db = Database(f"sqlite:///{tmp_path}/orders.db")
    db.migrate()
    yield Outbox(db, stream="orders")
    db.close()


def lease(outbox: Outbox) -> tuple[str | None, float]:
    with outbox.db.read() as conn:
        row = conn.execute(
            sa.select(relay_lease.c.holder, relay_lease.c.expires_at).where(
                relay_lease.c.name == OUTBOX_LEASE
            )
        ).one()
    return row.holder, row.expires_at


def test_a_free_lease_is_taken_and_then_held_against_others(outbox: Outbox, clock: Clock) -> None:
    assert outbox.acquire_lease("a", 15.0)
    assert lease(outbox) == ("a", NOW + 15.0)
    assert not outbox.acquire_lease("b", 15.0)
    assert lease(outbox) == ("a", NOW + 15.0)
    # The holder renews.
    clock.now += 5
    assert outbox.acquire_lease("a", 15.0)
    assert lease(outbox) == ("a", NOW + 20.0)


def test_a_lease_is_held_up_to_its_expiry_and_free_after(outbox: Outbox, clock: Clock) -> None:
    assert outbox.acquire_lease("a", 15.0)
    clock.now = NOW + 15.0  # the last instant of a's lease
    assert not outbox.acquire_lease("b", 15.0)
    clock.now = NOW + 15.001
    assert outbox.acquire_lease("b", 15.0)
    assert lease(outbox) == ("b", NOW + 30.001)


def test_only_the_holder_releases_and_a_release_frees_at_once(outbox: Outbox, clock: Clock) -> None:
    assert outbox.acquire_lease("a", 15.0)
    outbox.release_lease("b")
    assert lease(outbox) == ("a", NOW + 15.0)
    outbox.release_lease("a")
    assert lease(outbox) == (None, 0.0)
    assert outbox.acquire_lease("b", 15.0)


def test_an_abandoned_batch_stays_pending_even_if_completed_after(outbox: Outbox) -> None:
    with outbox.db.write() as conn:
        outbox.enqueue(conn, [(None, Message(data={"n": 1}))], datetime.now(UTC))
    batch = outbox.claim(10)
    assert len(batch.rows) == 1
    outbox.abandon(batch)
    outbox.complete(batch)  # a late complete of a given-up batch does nothing
    assert outbox.backlog() == 1
    assert len(outbox.claim(10).rows) == 1
