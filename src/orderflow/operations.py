"""The bus's operator tools, now :mod:`orderflow.bus.admin`; this name is kept for importers."""

from orderflow.bus.admin.dead_letters import (
    BATCH_SIZE,
    DeadLetter,
    DeadLetterCount,
    DeadLetterPage,
    ProgressCallback,
    PurgeResult,
    ReplayResult,
    count_dead_letters,
    dead_letter_snapshot,
    last_dead_letter_id,
    list_dead_letters,
    preview,
    purge_all_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from orderflow.bus.admin.errors import (
    AmbiguousDeadLetter,
    NoSuchGroup,
    OperationError,
    PositionAfterEnd,
)
from orderflow.bus.admin.groups import GroupReset, GroupResets, reset_group
from orderflow.bus.admin.ids import MAX_ID_PART, Position, parse_entry_id, parse_position
from orderflow.bus.admin.info import (
    LAG_COUNT_LIMIT,
    ConsumerInfo,
    GroupInfo,
    StreamInfo,
    stream_info,
)
from orderflow.bus.admin.metrics import record_stream_metrics
from orderflow.bus.admin.streams import dead_letter_stream, dead_letter_streams, stream_partitions

__all__ = [
    "BATCH_SIZE",
    "LAG_COUNT_LIMIT",
    "MAX_ID_PART",
    "AmbiguousDeadLetter",
    "ConsumerInfo",
    "DeadLetter",
    "DeadLetterCount",
    "DeadLetterPage",
    "GroupInfo",
    "GroupReset",
    "GroupResets",
    "NoSuchGroup",
    "OperationError",
    "Position",
    "PositionAfterEnd",
    "ProgressCallback",
    "PurgeResult",
    "ReplayResult",
    "StreamInfo",
    "count_dead_letters",
    "dead_letter_snapshot",
    "dead_letter_stream",
    "dead_letter_streams",
    "last_dead_letter_id",
    "list_dead_letters",
    "parse_entry_id",
    "parse_position",
    "preview",
    "purge_all_dead_letters",
    "purge_dead_letters",
    "record_stream_metrics",
    "replay_dead_letters",
    "reset_group",
    "stream_info",
    "stream_partitions",
]
