"""Opening Redis connections from URLs, and showing URLs without their secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import (
    ClusterPipeline,
    PipelineCommand,
    RedisCluster,
    TransactionStrategy,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

SCHEMES = ("redis", "rediss", "unix")


def validate_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL, else raise ValueError saying what is wrong."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"Redis URL {redact_url(url)!r} must start with redis://, rediss:// or unix://"
        )
    return url


class _QueuedTransaction(TransactionStrategy):
    """A cluster MULTI/EXEC whose commands are only queued until ``execute()``.

    redis-py 8.1's async cluster transaction runs every queued command in a new thread
    with its own event loop (``asyncio.run``) to find its slot, and blocks the caller's
    loop until it is done. When the client must refresh its slot map (at start, and
    after any connection error: a master killed), that thread runs the refresh on its
    throwaway loop: it fails with "bound to a different event loop" when the real
    loop is refreshing too, and otherwise freezes every task of the process for as
    long as the refresh takes (a dead node's connect timeout). Here the slots are found
    in ``execute()``, on the caller's loop. WATCH is not supported (orderflow uses none).
    """

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._watching or args[0] in self.IMMEDIATE_EXECUTE_COMMANDS:
            raise RedisClusterException(f"{args[0]} is not supported in this transaction")
        self._command_queue.append(PipelineCommand(len(self._command_queue), *args, **kwargs))
        return self._pipe

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self._pipe.cluster_client
        if client._initialize:
            await client.initialize()
        for command in self._command_queue:
            self._pipeline_slots.add(await client._determine_slot(*command.args))
        return await super().execute(raise_on_error, allow_redirections)


def _connection_reset(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's AttributeError for a connection closed under a command.

    When a cluster node dies, redis-py 8.1's async cluster client closes connections
    that another task is using; that task then fails on the closed socket with
    ``'NoneType' object has no attribute 'writelines'`` instead of a ConnectionError,
    which no retry (redis-py's or orderflow's) expects.
    """
    if not isinstance(exc, AttributeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "redis" in Path(tb.tb_frame.f_code.co_filename).parts


def _as_connection_error(exc: AttributeError) -> RedisConnectionError:
    return RedisConnectionError(f"connection closed while in use ({exc})")


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline whose closed-connection failures are ConnectionErrors."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        """Send the queued commands (see ClusterPipeline.execute)."""
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as exc:
            if not _connection_reset(exc):
                raise
            raise _as_connection_error(exc) from exc


#: Stream reads whose keys follow the ``STREAMS`` word; where the word may first be.
_STREAM_READS = {"XREAD": 0, "XREADGROUP": 3}


class ClusterClient(RedisCluster):
    """redis-py's asyncio ``RedisCluster``, loaded before its first command, with
    transactions that stay on the event loop, stream reads routed without asking a
    node first, and a connection closed under a command reported as a ConnectionError."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run a command; the slot map is loaded first (redis-py 8.1 loads it late)."""
        # redis-py picks a command's routing policy before loading the slot map; on a
        # fresh client (or one reloading after a failover) a keyed command then gets
        # the keyless policy: commands issued at once were found running twice, or
        # failing on a connection another task reset.
        try:
            if self._initialize:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            # Found by the failover test: an email sent, then its "sent" mark failed
            # with this AttributeError, which the Email Service does not retry; the
            # lease ran out and another worker sent the order again.
            if not _connection_reset(exc):
                raise
            raise _as_connection_error(exc) from exc

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # redis-py asks its "default node" (COMMAND GETKEYS) for the keys of every
        # XREADGROUP, as their place varies: a round trip per read, and when that node
        # is the master just killed, every read of every partition fails until the
        # client reloads its slot map. The keys follow STREAMS: find them here.
        first = _STREAM_READS.get(command.upper())
        if first is None:
            return await super()._determine_slot(command, *args)
        words = [a.upper() if isinstance(a, bytes | str) else a for a in args]
        for at in range(first, len(words)):
            if words[at] in (b"STREAMS", "STREAMS"):
                rest = args[at + 1 :]
                keys = rest[: len(rest) // 2]
                slots = {self.keyslot(key) for key in keys}
                if len(slots) != 1:
                    raise RedisClusterException(
                        f"{command} - all keys must map to the same key slot"
                    )
                return slots.pop()
        return await super()._determine_slot(command, *args)

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        """A pipeline; with ``transaction``, one MULTI/EXEC on one slot (see _QueuedTransaction)."""
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # (typed abstract by redis-py for an attribute its __init__ does not need)
        pipe: ClusterPipeline = cast(Any, _ClusterPipeline)(self, transaction)
        if transaction:
            pipe._execution_strategy = _QueuedTransaction(pipe)
        return pipe


#: URL -> whether it names a Redis Cluster node, as found by the first connect.
_CLUSTER_URLS: dict[str, bool] = {}


def connect(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` returning bytes; connects lazily.

    If ``url`` names a node of a Redis Cluster (``cluster_enabled:1``), the client is
    redis-py's ``RedisCluster`` instead, which speaks the same commands: every
    component built on ``connect`` then works on the cluster.
    """
    validate_url(url)
    options.setdefault("socket_keepalive", True)
    options.setdefault("health_check_interval", 30)
    options.setdefault("socket_connect_timeout", 5)
    if is_cluster_url(url):
        # No health check on the cluster client: redis-py 8.1's async cluster runs it
        # on connections to a node that just died and fails with an AttributeError.
        options.pop("health_check_interval", None)
        # A cluster client is not a Redis subclass but answers the same commands.
        return cast(aioredis.Redis, ClusterClient.from_url(url, decode_responses=False, **options))
    return aioredis.Redis.from_url(url, decode_responses=False, **options)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster node: asked once (``INFO cluster``), remembered.

    A server that cannot be reached is taken for a single server, and asked again on
    the next connect: clients connect lazily, Redis may come up later.
    """
    if url.startswith("unix:"):
        return False
    known = _CLUSTER_URLS.get(url)
    if known is not None:
        return known
    # Synchronous and short: once per URL per process, before the first command.
    probe = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        enabled = str(probe.info("cluster").get("cluster_enabled", 0)) == "1"
    except (redis.RedisError, OSError):
        return False
    finally:
        probe.close()
    _CLUSTER_URLS[url] = enabled
    return enabled


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
