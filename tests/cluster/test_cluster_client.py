"""The cluster client that ``connect`` gives: transactions stay on the caller's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from orderflow._compat.redis import CLUSTER_STREAM_ROUTING, CLUSTER_TRANSACTION
from orderflow.bus import connect

pytestmark = pytest.mark.slow

#: With orderflow._compat.redis's fixes off (another redis-py, or ORDERFLOW_COMPAT),
#: the client is redis-py's own, bugs included: these tests are of the fixes.
needs_queued_transaction = pytest.mark.skipif(
    not CLUSTER_TRANSACTION.enabled, reason=CLUSTER_TRANSACTION.reason
)
needs_stream_routing = pytest.mark.skipif(
    not CLUSTER_STREAM_ROUTING.enabled, reason=CLUSTER_STREAM_ROUTING.reason
)


@needs_queued_transaction
async def test_commands_at_once_on_a_fresh_client_run_once(cluster_url: str) -> None:
    # A fresh client loads the slot map on its first commands. With redis-py 8.1's
    # own client, commands issued at once sometimes ran twice or failed ("NoneType has
    # no attribute writelines"), and its cluster transactions loaded the map on a
    # thread's event loop ("bound to a different event loop"). A few fresh clients.
    for round_ in range(16):
        client = connect(cluster_url)
        try:

            async def dead_letter(i: int, client: Any = client) -> Any:
                pipe = client.pipeline(transaction=True)
                pipe.xadd("{t:1}:dlq", {"i": i})
                pipe.xadd("{t:1}", {"i": i})
                return await pipe.execute()

            results = await asyncio.gather(
                *(client.xadd("{t:2}", {"i": i}) for i in range(5)),
                *(dead_letter(i) for i in range(20)),
                return_exceptions=True,
            )
            assert [r for r in results if isinstance(r, BaseException)] == [], round_
            lengths = [await client.xlen(k) for k in ("{t:1}", "{t:1}:dlq", "{t:2}")]
            assert lengths == [20, 20, 5], round_
            await client.delete("{t:1}", "{t:1}:dlq")
            await client.delete("{t:2}")
        finally:
            await client.aclose()


async def test_a_transaction_is_atomic(cluster_url: str) -> None:
    client = connect(cluster_url)
    try:
        await client.set("{t:3}:flag", "x")
        pipe = client.pipeline(transaction=True)
        pipe.xadd("{t:3}", {"a": 1})
        pipe.incr("{t:3}:flag")  # fails inside EXEC: a string, not an integer
        with pytest.raises(Exception, match="not an integer"):
            await pipe.execute()
        assert await client.xlen("{t:3}") == 1  # MULTI/EXEC: no rollback, as in Redis
    finally:
        await client.aclose()


@needs_queued_transaction
async def test_a_queued_transaction_is_one_slot_and_has_no_watch(cluster_url: str) -> None:
    client = connect(cluster_url)
    try:
        cross = client.pipeline(transaction=True)
        cross.xadd("{t:4}", {"a": 1})
        cross.xadd("{t:5}", {"a": 1})
        with pytest.raises(RedisClusterException, match="same slot"):
            await cross.execute()
        assert not await client.exists("{t:4}", "{t:5}")

        watching = client.pipeline(transaction=True)
        with pytest.raises(RedisClusterException, match="WATCH is not supported"):
            watching.execute_command("WATCH", "{t:3}")
    finally:
        await client.aclose()


@needs_stream_routing
async def test_stream_reads_are_routed_without_asking_a_node(
    cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py asked its default node for the keys of every XREADGROUP (COMMAND
    # GETKEYS): a round trip per read, and none at all once that node was killed.
    client: Any = connect(cluster_url)
    try:
        await client.initialize()

        async def no_round_trip(*args: Any) -> Any:
            raise AssertionError(f"asked a node for the keys of {args[0]}")

        monkeypatch.setattr(client.commands_parser, "_get_moveable_keys", no_round_trip)
        for name in ("{r:1}", "{r:2}", "{r:3}"):
            entry = await client.xadd(name, {"i": name})
            await client.xgroup_create(name, "g", id="0")
            ((stream, ((got, _),)),) = await client.xreadgroup("g", "c", {name: ">"}, block=10)
            assert (stream.decode(), got) == (name, entry)
            ((_, rows),) = await client.xread({name: "0"}, count=1)
            assert rows[0][0] == entry
        # Keys in two slots: redis-py's own check still refuses them.
        with pytest.raises(Exception, match="same key slot"):
            await client.xread({"{r:1}": "0", "{r:2}": "0"})
    finally:
        await client.aclose()


@pytest.fixture
def closed_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Arm: the next connection opened is closed by "another task" before its command
    is written, as redis-py's cluster client does to a node's connections when a node
    dies (the command then failed with an AttributeError)."""
    original = AbstractConnection.connect_check_health
    armed: list[bool] = []

    async def connect_then_close(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        await original(self, *args, **kwargs)
        if armed:
            armed.clear()
            await self.disconnect()

    monkeypatch.setattr(AbstractConnection, "connect_check_health", connect_then_close)
    return lambda: armed.append(True)


async def _reconnecting(client: Any) -> None:
    """Close every connection of ``client``, so the next command opens one."""
    for node in client.get_nodes():
        await node.disconnect()


@pytest.mark.parametrize("how", ["command", "pipeline", "transaction"])
async def test_a_connection_closed_under_a_command_is_a_connection_error(
    cluster_url: str, closed_once: Callable[[], None], how: str
) -> None:
    client: Any = connect(cluster_url)
    try:
        await client.set("{c}:k", "0")

        async def run() -> Any:
            if how == "command":
                return await client.incr("{c}:k")
            pipe = client.pipeline(transaction=how == "transaction")
            pipe.incr("{c}:k")
            return (await pipe.execute())[0]

        await _reconnecting(client)
        closed_once()
        # A ConnectionError, which every caller retries; nothing was written.
        with pytest.raises(RedisConnectionError, match="closed while in use"):
            await run()
        assert await client.get("{c}:k") == b"0"
        assert await run() == 1
    finally:
        await client.aclose()
