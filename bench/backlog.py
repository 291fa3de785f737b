"""Skipping the backlog a saturation run leaves, before a latency run (bench case 3).

At saturation the API takes orders faster than they are emailed, so tens of thousands of
entries are still unread when it ends; at the slower rate of a busy machine they take
minutes to email. A latency run started behind them measures the backlog, not the stack
(or finds none of its own orders emailed in time: NaN). Waiting for the Maildir to stop
growing is no test of that: under load it never stops, and a sink's fsync stall looks
like stillness. So each consumer group is moved past every entry (``XGROUP SETID … $``),
again while entries keep arriving (a relay catching up with its outbox), and the run
waits until what the consumers already hold is acknowledged. Whatever is left at the
deadline is a :class:`BacklogError` naming it, never a silent start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError


class BacklogError(RuntimeError):
    """The backlog was not gone by the deadline; the message says which group holds what."""


@dataclass(frozen=True)
class Group:
    """A consumer group whose backlog is skipped."""

    stream: str
    group: str


@dataclass(frozen=True)
class GroupState:
    """One group after a skip: caught up when nothing is unread or unacknowledged."""

    group: Group
    #: Whether entries were appended after the one the group last delivered.
    unread: bool
    pending: int

    @property
    def caught_up(self) -> bool:
        """Nothing left to read or to acknowledge."""
        return not self.unread and self.pending == 0

    def describe(self) -> str:
        """What is left, for the error."""
        unread = "entries unread, " if self.unread else ""
        return f"{self.group.stream}/{self.group.group}: {unread}{self.pending} pending"


async def skip_backlog(
    redis_url: str,
    groups: Sequence[Group],
    *,
    within_s: float,
    settled: Callable[[], Awaitable[bool]] | None = None,
    interval_s: float = 0.05,
) -> None:
    """Move each group past every unread entry and wait for in-flight ones to be acked.

    ``settled`` says whether the producer still has entries to append (orderflow's relay:
    outbox rows not yet published); the groups are moved again until it says no and
    nothing was appended meanwhile. Raises :class:`BacklogError` after ``within_s``.
    """
    client = aioredis.Redis.from_url(redis_url)
    deadline = time.monotonic() + within_s
    try:
        while True:
            # Asked first: once the producer is done, the skip that follows is the last.
            done_producing = settled is None or await settled()
            states = [await _skip(client, group) for group in groups]
            if done_producing and all(state.caught_up for state in states):
                return
            if time.monotonic() > deadline:
                left = "; ".join(state.describe() for state in states if not state.caught_up)
                if not done_producing:
                    left = "the producer still has entries to append; " + left
                raise BacklogError(f"backlog not gone after {within_s:.0f} s: {left}")
            await asyncio.sleep(interval_s)
    finally:
        await client.aclose()


async def _skip(client: aioredis.Redis, group: Group) -> GroupState:
    try:
        await client.xgroup_setid(group.stream, group.group, "$")
        stream = await client.xinfo_stream(group.stream)
        infos = await client.xinfo_groups(group.stream)
    except ResponseError as exc:  # no such stream or group: nothing read it yet
        raise BacklogError(f"{group.stream}/{group.group}: {exc}") from None
    info = next(i for i in infos if _text(i["name"]) == group.group)
    last = _text(stream["last-generated-id"])
    return GroupState(
        group,
        unread=_text(info["last-delivered-id"]) != last,
        pending=int(info["pending"]),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
