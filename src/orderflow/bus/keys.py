"""Key names of a stream and its companions, chosen so they can live in one cluster slot."""

from __future__ import annotations

from dataclasses import dataclass

DLQ_SUFFIX = ":dlq"


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one (partition of a) stream.

    A single stream keeps the contract's plain names (``orders``, ``orders:dlq``).
    A partition is named ``{orders:3}`` so that its dead letters, ``{orders:3}:dlq``,
    hash to the same Redis Cluster slot and a dead-lettering can be one transaction.
    """

    stream: str

    def __post_init__(self) -> None:
        if not self.stream or any(ch.isspace() for ch in self.stream):
            raise ValueError(f"stream name {self.stream!r} must be non-empty, without spaces")

    @property
    def dlq(self) -> str:
        """The dead-letter stream of this stream."""
        return self.stream + DLQ_SUFFIX

    @classmethod
    def partition(cls, stream: str, index: int, count: int) -> StreamKeys:
        """The keys of partition ``index`` of ``count``; one partition keeps plain names."""
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"partition {index} out of range for {count} partitions")
        if count == 1:
            return cls(stream)
        return cls(f"{{{stream}:{index}}}")
