"""Which server orderflow talks to, and its optional features: found by asking, not by version.

Valkey reports its own version numbers (and an old ``redis_version`` for compatibility),
so a version string says little about a feature. Each optional feature orderflow adapts
to is probed with the command itself, in a way that changes nothing:

- ``xtrim_acked``: ``XTRIM … ACKED`` (Redis 8.2+), the server keeping entries some
  group has not acknowledged; else the publisher trims with its own script.
- ``xinfo_lag``: ``XINFO`` reporting a group's lag and a stream's entries added
  (Redis 7.0+, Valkey); else ``streams info`` counts the lag itself.

XAUTOCLAIM's list of deleted ids (Redis 7.0+) is not probed here (a probe would create
a consumer on Valkey): the worker sees it in each reply and adapts there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

#: A MAXLEN no stream reaches: an XTRIM with it removes nothing.
_NO_TRIM = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The server's name (``redis`` or ``valkey``), version, mode and probed features."""

    name: str
    version: str
    #: ``standalone`` or ``cluster``.
    mode: str
    #: Feature -> whether the server has it; None when the probe could not tell.
    features: dict[str, bool | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"name", "version", "mode", "features": {name: true|false|null}}``."""
        return asdict(self)


async def probe_acked_trim(redis: aioredis.Redis, stream: str) -> bool:
    """Whether ``XTRIM stream … ACKED`` exists, asked with a trim that removes nothing.

    Raises what else the server answers (``NOPERM`` for a user without ``XTRIM``).
    """
    try:
        await cast(Any, redis).execute_command("XTRIM", stream, "MAXLEN", _NO_TRIM, "ACKED")
    except ResponseError as exc:
        if is_syntax_error(exc):
            return False
        raise
    return True


def is_syntax_error(exc: ResponseError) -> bool:
    """Whether the server refused a command's arguments (an option it does not know)."""
    return str(exc).lower().startswith("syntax error")


async def server_info(redis: aioredis.Redis, stream: str) -> ServerInfo:
    """Describe the server behind ``redis``, probing its features on ``stream``.

    ``stream`` should exist (for ``xinfo_lag``; unknown, None, otherwise); the probes
    need ``INFO``, ``XTRIM`` and ``XINFO STREAM`` on it (a refusal gives None).
    """
    cluster = isinstance(redis, RedisCluster)
    options: dict[str, Any] = {"target_nodes": RedisCluster.RANDOM} if cluster else {}
    info = await cast(Any, redis).execute_command("INFO", "server", **options)
    # redis-py parses INFO into a dict; a cluster client may key it by node.
    if cluster and info and all(isinstance(v, dict) for v in info.values()):
        info = next(iter(info.values()))
    name = str(info.get("server_name") or "redis").lower()
    version = str(info.get(f"{name}_version") or info.get("redis_version") or "?")
    features: dict[str, bool | None] = {}
    try:
        features["xtrim_acked"] = await probe_acked_trim(redis, stream)
    except NoPermissionError:
        features["xtrim_acked"] = None
    try:
        reply = await redis.xinfo_stream(stream)
        features["xinfo_lag"] = "entries-added" in reply
    except ResponseError:  # no such stream, or not allowed
        features["xinfo_lag"] = None
    return ServerInfo(name, version, "cluster" if cluster else "standalone", features)
