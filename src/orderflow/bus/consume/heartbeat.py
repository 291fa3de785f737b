"""Keeping held entries and the consumer list in order, with two atomic Lua scripts."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from orderflow.bus.entries import text

__all__ = ["Heartbeat"]

# Refreshes the idle time of the entries this consumer still owns, so that a long
# handler or a pending retry is not claimed by another consumer while this one lives.
# Checks the owner first, in the same atomic step, so it never steals an entry back.
# Returns the ids this consumer no longer owns.
_HEARTBEAT_SCRIPT = """
local lost = {}
for i = 2, #ARGV - 1 do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #row == 1 and row[1][2] == ARGV[#ARGV] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[#ARGV], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""

# Deletes consumers of a group that are idle and own nothing, atomically, so a
# consumer that reads an entry in between is never deleted with it.
_PRUNE_SCRIPT = """
local deleted = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0
     and tonumber(info['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    table.insert(deleted, info['name'])
  end
end
return deleted
"""


class Heartbeat:
    """One consumer's ownership checks on one stream: refresh what it holds, prune the idle."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, consumer: str) -> None:
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._refresh: Any = redis.register_script(_HEARTBEAT_SCRIPT)
        self._prune: Any = redis.register_script(_PRUNE_SCRIPT)

    async def refresh(self, held: list[str]) -> list[str]:
        """Reset the idle time of the ``held`` entries this consumer still owns; returns
        the ids another consumer owns now (or that were acknowledged elsewhere)."""
        lost = await self._refresh(keys=[self._stream], args=[self._group, *held, self._consumer])
        return [text(raw) for raw in lost]

    async def prune(self, idle_ms: int) -> list[str]:
        """Remove the group's other consumers idle over ``idle_ms`` that own nothing;
        returns their names."""
        deleted = await self._prune(
            keys=[self._stream], args=[self._group, idle_ms, self._consumer]
        )
        return [text(name) for name in deleted]
