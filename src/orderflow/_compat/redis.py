"""redis-py internals: raw pooled round trips, and two fixes of its async cluster client.

Three fast paths, each on only for the redis-py versions it was written and tested for
(:data:`TESTED`); off, orderflow uses redis-py's public API as it is:

- ``redis.stream_io``: a speed-up. Commands packed by hiredis in C and sent on a pooled
  connection driven by hand (``get_connection``, ``send_packed_command``,
  ``read_response``), replies used as hiredis parses them. Fallback: redis-py's
  pipeline and ``xreadgroup``.
- ``redis.cluster_transaction``: a bug fix. redis-py's async cluster MULTI/EXEC (every
  release that has one: 6.2.0 to 8.1.0, the latest) runs each queued command through
  ``asyncio.run`` in a new thread to find its slot, blocking the caller's event loop;
  when the slot map must be reloaded (at start, after a failover) that fails with
  "bound to a different event loop", or freezes the process for a dead node's connect
  timeout. The fix (:class:`_QueuedTransaction`) only queues commands and finds their
  slots in ``execute()``, on the caller's loop. Fallback: redis-py's transaction.
- ``redis.cluster_stream_routing``: a speed-up and a failover fix. redis-py (6.2.0 to
  8.1.0 at least) asks its default node (``COMMAND GETKEYS``) for the keys of every
  XREAD/XREADGROUP: a round trip per read, and every read fails while that node is
  down. Here the keys are found after ``STREAMS``. Fallback: redis-py's routing.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence
from typing import Any, cast

from hiredis import pack_command
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from orderflow._compat import decide

#: The redis-py versions these fast paths were tested on: the worker, transport,
#: retention and cluster client/flow tests pass with 6.2.0, 7.4.1, 8.0.1 and 8.1.0 (but
#: one, which fails on 6.2.0 with the fast paths off too: its pipeline errors lose the
#: server's message). Before 6.2, redis-py's async cluster has no transactions at all.
TESTED = ((6, 2), (8, 2))
STREAM_IO = decide("redis.stream_io", "redis", TESTED)
CLUSTER_TRANSACTION = decide("redis.cluster_transaction", "redis", TESTED)
CLUSTER_STREAM_ROUTING = decide("redis.cluster_stream_routing", "redis", TESTED)


# -- redis.stream_io ---------------------------------------------------------------------


def plain_pool(redis: Any) -> Any:
    """The client's connection pool, when raw round trips may use it; else None.

    None when the fast path is off, and for a cluster client or one bound to a single
    connection (their commands must go through redis-py).
    """
    if not STREAM_IO.enabled:
        return None
    pool = getattr(redis, "connection_pool", None)
    if pool is None or getattr(redis, "connection", None) is not None:
        return None
    return pool


async def round_trip(
    pool: Any, commands: Sequence[tuple[Any, ...]], wait_s: float = 0.0
) -> list[Any]:
    """Send ``commands`` (packed by hiredis) in one write on a pooled connection and
    return their raw replies; error replies are returned, not raised.

    The replies get the client's socket timeout (if any) plus ``wait_s``, all together.
    """
    packed = b"".join([pack_command(command) for command in commands])
    replies = len(commands)
    connection = await pool.get_connection()

    async def attempt() -> list[Any]:
        await connection.send_packed_command(packed)
        received: list[Any] = []
        # One deadline for all the replies rather than one each (math.inf: none per read).
        timeout = connection.socket_timeout
        async with asyncio.timeout(None if timeout is None else timeout + wait_s):
            for _ in range(replies):
                try:
                    received.append(await connection.read_response(timeout=math.inf))
                except ResponseError as exc:
                    # Returned, so the connection stays in step with its replies.
                    received.append(exc)
        return received

    async def reset(_error: Exception) -> None:
        await connection.disconnect()

    try:
        # Retried on connection errors like redis-py's own commands (and, like them, a
        # retry after a lost reply may append an entry twice: consumers deduplicate).
        return cast(list[Any], await connection.retry.call_with_retry(attempt, reset))
    except BaseException:
        # Cancelled or failed mid-way: replies may still be on their way, so this
        # connection is out of step with its commands. Drop it, never reuse it.
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


# -- redis.cluster_transaction -------------------------------------------------------------


def queue_transaction(pipe: ClusterPipeline) -> None:
    """Make the transaction pipeline ``pipe`` queue its commands until ``execute()``
    (a no-op when the fast path is off: redis-py's own transaction)."""
    if CLUSTER_TRANSACTION.enabled:
        internal: Any = pipe
        internal._execution_strategy = _queued_transaction()(pipe)


@functools.cache
def _queued_transaction() -> type[Any]:
    # Defined on first use: TransactionStrategy exists only in redis-py 6.2 and later.
    from redis.asyncio.cluster import PipelineCommand, TransactionStrategy

    class _QueuedTransaction(TransactionStrategy):
        """A cluster MULTI/EXEC whose commands are only queued until ``execute()``,
        where their slots are found on the caller's loop. WATCH is not supported."""

        def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if self._watching or args[0] in self.IMMEDIATE_EXECUTE_COMMANDS:
                raise RedisClusterException(f"{args[0]} is not supported in this transaction")
            self._command_queue.append(PipelineCommand(len(self._command_queue), *args, **kwargs))
            return self._pipe

        async def execute(
            self, raise_on_error: bool = True, allow_redirections: bool = True
        ) -> Any:
            client = self._pipe.cluster_client
            await client.initialize()  # public, and a no-op once the slot map is loaded
            for command in self._command_queue:
                self._pipeline_slots.add(await client._determine_slot(*command.args))
            return await super().execute(raise_on_error, allow_redirections)

    return _QueuedTransaction


# -- redis.cluster_stream_routing ------------------------------------------------------------

#: Stream reads whose keys follow the ``STREAMS`` word; where the word may first be.
_STREAM_READS = {"XREAD": 0, "XREADGROUP": 3}


class RoutingCluster(RedisCluster):
    """redis-py's asyncio ``RedisCluster``; with the fast path on, stream reads are
    routed from their keys without asking a node. Off, it adds nothing."""

    if CLUSTER_STREAM_ROUTING.enabled:

        async def _determine_slot(self, command: str, *args: Any) -> int:
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
