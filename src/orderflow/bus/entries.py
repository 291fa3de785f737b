"""Small facts about stream entries that every part of the bus shares."""

from __future__ import annotations

__all__ = ["DLQ_FIELD_PREFIX", "id_key", "is_dlq_field", "text"]

#: Fields a dead-lettering adds to an entry (``dlq_reason``, ``dlq_deliveries`` ...).
DLQ_FIELD_PREFIX = "dlq_"


def text(value: object) -> str:
    """A name or id as Redis replied it (bytes on a bytes client) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def id_key(entry_id: str) -> tuple[int, int]:
    """A sort key for stream entry ids (``ms-seq``): their order in the stream."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def is_dlq_field(name: bytes | str) -> bool:
    """Whether ``name`` is a field a dead-lettering added."""
    return (name.decode(errors="replace") if isinstance(name, bytes) else name).startswith(
        DLQ_FIELD_PREFIX
    )
