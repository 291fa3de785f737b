"""Fixtures of the Order Service tests: databases (SQLite and PostgreSQL), apps, helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from fastapi import FastAPI
from pydantic import SecretStr

from orderflow.config import Settings
from orderflow.orders import create_app
from orderflow.orders.database import MIGRATIONS_DIR, Database
from orderflow.orders.runtime import OrderRuntime
from orderflow.orders.schema import idempotency_keys, orders, outbox
from tests.support import wait_until


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh database: SQLite in the test's directory, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/orders.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


def make_settings(database_url: str, redis_url: str, data_dir: Any, **options: Any) -> Settings:
    """Settings on these servers (other options as given)."""
    return Settings(
        redis_url=SecretStr(redis_url),
        database_url=SecretStr(database_url),
        data_dir=data_dir,
        **options,
    )


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Any) -> Settings:
    """Settings on the shared test Redis and this test's database."""
    return make_settings(database_url, redis_url, tmp_path)


@dataclass
class Api:
    """A running app and an HTTP client on it (in process, lifespan included)."""

    app: FastAPI
    client: httpx.AsyncClient

    @property
    def runtime(self) -> OrderRuntime:
        """The app's store, relay and database."""
        runtime: OrderRuntime = self.app.state.orders
        return runtime

    async def post(self, body: Any, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """POST /orders with ``body`` as JSON (or raw bytes)."""
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Idempotency-Key"] = key
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        headers.setdefault("content-type", "application/json")
        return await self.client.post("/orders", content=content, headers=headers, **kwargs)

    async def counts(self) -> dict[str, int]:
        """Rows in orders, outbox and idempotency_keys."""
        db = self.runtime.db

        def count() -> dict[str, int]:
            with db.read() as conn:
                return {
                    table.name: int(
                        conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                    )
                    for table in (orders, outbox, idempotency_keys)
                }

        return await db.run(count)


@asynccontextmanager
async def running_api(settings: Settings, **options: Any) -> AsyncIterator[Api]:
    """The app with its lifespan (background loops off unless asked for) and a client."""
    options.setdefault("run_relay", False)
    options.setdefault("run_email_status", False)
    options.setdefault("run_reconciler", False)
    app = create_app(settings, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders.test") as client:
            yield Api(app, client)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    """The app with no background loops: tests drive the relay themselves."""
    async with running_api(settings) as running:
        yield running


async def stream_events(redis: aioredis.Redis, stream: str = "orders") -> list[dict[str, Any]]:
    """The decoded ``data`` of every entry of ``stream``, oldest first."""
    entries = await redis.xrange(stream)
    return [orjson.loads(fields[b"data"]) for _, fields in entries]


async def until_true(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Await ``check()`` until it is True."""
    await wait_until(check, timeout)


@contextmanager
def migrated_to(db: Database, revision: str) -> Iterator[sa.Connection]:
    """A transaction on ``db`` with the schema migrated only up to ``revision``: for rows
    that predate the later migrations (``db.migrate()`` then takes it to the head)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        yield conn
