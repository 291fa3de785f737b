"""Opening Redis connections from URLs, and showing URLs without their secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from orderflow._compat.redis import RoutingCluster, queue_transaction

SCHEMES = ("redis", "rediss", "unix")


def validate_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL, else raise ValueError saying what is wrong."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"Redis URL {redact_url(url)!r} must start with redis://, rediss:// or unix://"
        )
    return url


def _connection_reset(exc: BaseException) -> bool:
    """Whether ``exc`` is redis-py's AttributeError for a connection closed under a command.

    When a cluster node dies, redis-py's async cluster client (8.1.0, the latest release,
    and earlier) closes connections that another task is using; that task then fails on
    the closed socket with ``'NoneType' object has no attribute 'writelines'`` instead
    of a ConnectionError, which no retry (redis-py's or orderflow's) expects. Reads no
    internals, so it stays on whatever the version: on a fixed release it never fires.
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


class ClusterClient(RoutingCluster):
    """redis-py's asyncio ``RedisCluster``, loaded before its first command, with a
    connection closed under a command reported as a ConnectionError; where the installed
    redis-py allows (see orderflow._compat.redis), transactions that stay on the event
    loop and stream reads routed without asking a node first."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run a command; the slot map is loaded first (redis-py 8.1 loads it late)."""
        # redis-py picks a command's routing policy before loading the slot map; on a
        # fresh client (or one reloading after a failover) a keyed command then gets
        # the keyless policy: commands issued at once were found running twice, or
        # failing on a connection another task reset. initialize() is a no-op once
        # the map is loaded.
        try:
            await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            # Found by the failover test: an email sent, then its "sent" mark failed
            # with this AttributeError, which the Email Service does not retry; the
            # lease ran out and another worker sent the order again.
            if not _connection_reset(exc):
                raise
            raise _as_connection_error(exc) from exc

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        """A pipeline; with ``transaction``, one MULTI/EXEC on one slot."""
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # (typed abstract by redis-py for an attribute its __init__ does not need)
        pipe: ClusterPipeline = cast(Any, _ClusterPipeline)(self, transaction)
        if transaction:
            queue_transaction(pipe)
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
