"""Fixtures of the Redis Cluster tests: one cluster of 3 masters and 3 replicas per session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from orderflow.bus import connect
from orderflow.config import Settings
from tests import support
from tests.cluster.harness import LocalCluster
from tests.email import conftest as email_fixtures
from tests.email.conftest import SmtpFixture


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """``tests.support.wait_until`` with the longer patience a cluster needs."""
    return await support.wait_until(predicate, timeout, interval)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of 3 masters + 3 replicas on free loopback ports, node timeout 1 s."""
    local = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    """The cluster (every node running and ok), emptied before the test."""
    for node in cluster.nodes:
        if node not in cluster.running():
            node.start()
    cluster.wait_ok()
    cluster.flushall()
    return cluster.url


@pytest.fixture
async def acluster(cluster_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client on the cluster, as every component gets it (``connect``)."""
    client = connect(cluster_url)
    yield client
    await client.aclose()


#: The Email Service tests' SMTP server (aiosmtpd, recording what it accepts).
smtp = email_fixtures.smtp


@pytest.fixture
def cluster_settings(cluster_url: str, smtp: SmtpFixture, tmp_path: Path) -> Settings:
    """Settings on the cluster, SQLite in tmp_path and the test SMTP server."""
    return Settings(
        redis_url=SecretStr(cluster_url),
        database_url=SecretStr(f"sqlite:///{tmp_path / 'orders.db'}"),
        smtp_url=SecretStr(smtp.url),
        data_dir=tmp_path,
        claim_idle_ms=1000,
        max_deliveries=20,
    )
