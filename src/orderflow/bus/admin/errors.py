"""What the operator operations refuse, saying what is wrong (the CLI names its flags)."""

from __future__ import annotations


class OperationError(RuntimeError):
    """An operation that cannot be done on the current state of Redis."""


class NoSuchGroup(OperationError):
    """The consumer group (or its stream) does not exist."""


class AmbiguousDeadLetter(OperationError):
    """A dead-letter id found in more than one partition: the operator must name one."""

    def __init__(self, places: dict[str, list[str]]) -> None:
        #: Each ambiguous dead-letter id, and the dead-letter streams holding it.
        self.places = places
        found = "; ".join(f"{i} is in {' and '.join(dlqs)}" for i, dlqs in places.items())
        super().__init__(f"dead letter {found}: name its partition; nothing was done")


class PositionAfterEnd(ValueError):
    """A group position after the newest entry of the stream (which Redis would accept,
    and the group would skip every entry added until then)."""
