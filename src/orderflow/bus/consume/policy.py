"""What a consumer mode chooses; the engine does everything else the same way in every mode.

A new mode is a :class:`Policy` (and, if it needs one, a worker that decides which
streams to run the engine on, like :class:`~orderflow.bus.consume.ordered.OrderedWorker`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMPETING", "ORDERED", "Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """What a consumer mode chooses; the engine does the rest the same way in every mode."""

    #: Claim entries other consumers left idle for ``claim_idle_ms``, every claim interval.
    claim_idle: bool = True
    #: Before reading new entries, take over every pending entry of the group (at any
    #: idle time), in stream order: for the sole owner of a stream.
    take_pending_first: bool = False
    #: Retry a failed entry in place, holding everything behind it (ordered); else it
    #: waits aside for its retry while later entries go on.
    retry_in_place: bool = False
    #: On stop, handle what was read but not started; else it stays pending, in order,
    #: for the next owner.
    finish_read_on_stop: bool = True


#: Competing consumers: every consumer of the group reads, claims and retries aside.
COMPETING = Policy()
#: The sole owner of a stream: takes over what earlier owners left, then one entry at
#: a time (with ``concurrency=1``), retrying in place.
ORDERED = Policy(
    claim_idle=False, take_pending_first=True, retry_in_place=True, finish_read_on_stop=False
)
