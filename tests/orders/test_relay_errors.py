"""Redis answering the relay's XADD with an error reply (not a dropped connection).

An ACL user without ``+xadd`` gets ``NOPERM``; a server over ``maxmemory`` gets ``OOM``.
Either way the events were not stored: the relay must keep the outbox rows, say what
Redis answered and count the failure, and publish everything, in order, once the
cause is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer
from orderflow.orders import RelayConfig
from tests.support import order_body, wait_until

from .conftest import make_settings, running_api, stream_events

pytestmark = pytest.mark.slow

PASSWORD = "relay-password-for-this-test"


async def _noperm(admin: aioredis.Redis, server: RedisServer) -> tuple[str, Callable[[], Any]]:
    """An ACL user allowed everything but XADD; the fix grants it."""
    await admin.acl_setuser(
        "relay",
        enabled=True,
        passwords=[f"+{PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-xadd"],
    )
    url = f"redis://relay:{PASSWORD}@127.0.0.1:{server.port}/0"

    async def fix() -> None:
        await admin.acl_setuser("relay", enabled=True, commands=["+xadd"])

    return url, fix


async def _oom(admin: aioredis.Redis, server: RedisServer) -> tuple[str, Callable[[], Any]]:
    """A server of our own over its memory limit (``maxmemory 1``, no eviction)."""
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1")

    async def fix() -> None:
        await admin.config_set("maxmemory", "0")

    return server.url, fix


@pytest.mark.parametrize(
    ("fault", "reply"),
    # What redis-py makes of NOPERM and OOM (it drops the error code).
    [(_noperm, "no permissions to run the 'xadd' command"), (_oom, "maxmemory")],
    ids=["noperm", "oom"],
)
async def test_an_error_reply_to_xadd_keeps_the_rows_is_reported_and_publishes_once_fixed(
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: Callable[[aioredis.Redis, RedisServer], Awaitable[tuple[str, Callable[[], Any]]]],
    reply: str,
) -> None:
    admin = connect(redis_server.url)
    try:
        url, fix = await fault(admin, redis_server)
        settings = make_settings(f"sqlite:///{tmp_path}/orders.db", url, tmp_path)
        config = RelayConfig(retry_max_s=0.2)
        caplog.set_level(logging.WARNING, logger="orderflow.orders.relay")
        async with running_api(settings, run_relay=True, relay_config=config) as api:
            relay = api.runtime.relay
            ids = []
            for n in range(5):
                response = await api.post(order_body(n))
                assert response.status_code == 201
                ids.append(response.json()["id"])
            # Refused more than once (so retried, not given up on) ...
            await wait_until(lambda: relay.stats.errors >= 2, timeout=10)
            # ... and nothing was marked done: every row is still in the outbox.
            assert (await api.counts())["outbox"] == 5
            assert relay.stats.published == 0
            assert await admin.xlen("orders") == 0
            assert reply in caplog.text, caplog.text

            await fix()
            await wait_until(lambda: relay.stats.published == 5, timeout=10)
            assert (await api.counts())["outbox"] == 0
            events = await stream_events(admin)
            assert [event["id"] for event in events] == ids
    finally:
        await admin.aclose()
