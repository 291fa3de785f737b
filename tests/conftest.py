"""Shared fixtures: private Redis servers, PostgreSQL, and async Redis clients."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the tests that neither kill nor reconfigure it."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"), appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(shared_redis: RedisServer) -> str:
    """The shared server's URL, emptied before each test."""
    client = redis.Redis.from_url(shared_redis.url)
    client.flushall()
    client.close()
    return shared_redis.url


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client (bytes) on the emptied shared server."""
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, with AOF ``always``: safe to kill and restart."""
    server = RedisServer(tmp_path / "redis", appendfsync="always")
    server.start()
    yield server
    server.stop()


def _postgres_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The local PostgreSQL server; skipped when absent, a failure when CI=true."""
    url = os.environ.get(
        "ORDERFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    if not _postgres_reachable("127.0.0.1", 5432) and "127.0.0.1:5432" in url:
        if IN_CI:
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and CI=true")
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    return url


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy as sa

    name = f"orderflow_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = postgres_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
