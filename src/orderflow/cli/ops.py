"""Operator commands: ``streams info``, ``dlq list|replay|purge``, ``group reset``.

Thin wrappers over :mod:`orderflow.bus.admin`: they parse and check arguments (a bad
one exits 2 before anything changes), print rich tables or ``--json``, and map a
missing group, an unknown dead-letter id or an unusable key to exit 1.

``--json`` output (stable keys):

- ``streams info``: ``{"redis": <URL, password redacted>, "server": <ServerInfo>,
  "streams": [<StreamInfo>...]}``, the server as in :mod:`orderflow.bus.server`
  (``{"name": "redis"|"valkey", "version", "mode": "standalone"|"cluster",
  "features": {"xtrim_acked", "xinfo_lag": true|false|null}}``), each stream as
  documented in :mod:`orderflow.bus.admin.info`; a partitioned stream is the sum of its
  partitions with each partition under ``partitions`` (empty otherwise);
  ``"versions_in_flight": {<stream>: {"order.created v2": <n>, ...}}`` counts the event
  versions among each stream's newest entries (see :mod:`orderflow.contracts.inflight`).
- ``dlq list``: ``{"stream", "dead_letter_stream", "total", "entries": [{"id",
  "dead_letter_stream", "source_stream", "source_id", "group", "consumer", "reason",
  "deliveries", "time", "fields", "preview"}], "partitions": [{"dead_letter_stream",
  "total"}]}``, oldest first (over every partition); ``fields`` are the original fields
  (bytes that are not UTF-8 escaped as ``\\xNN``), ``preview`` one printable line of the
  payload. ``partitions`` is empty for a single stream; for a partitioned one it counts
  each partition's dead letters, and the top ``dead_letter_stream`` is the logical name.

Every command finds a stream's partitions from the count recorded in Redis; a partition
is named alone with ``--stream '{orders:3}'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from orderflow.bus import StreamKeys, redact_url
from orderflow.bus import admin as ops
from orderflow.bus.keys import DLQ_SUFFIX
from orderflow.bus.server import ServerInfo, server_info
from orderflow.cli.common import CommandError, UsageError, load_settings, redis_client
from orderflow.config import Settings, resolve_redis_url
from orderflow.contracts.inflight import SAMPLE as IN_FLIGHT_SAMPLE
from orderflow.contracts.inflight import versions_in_flight
from orderflow.formatting import human_duration, human_size

#: Replays of more dead letters than this show a progress bar (on a terminal).
PROGRESS_THRESHOLD = 20
#: Narrowest a wrapping table column gets; ids and names are never cut.
MIN_TEXT_WIDTH = 12
#: Width of tables written to a pipe or file, which has no width of its own.
PIPE_WIDTH = 160

_RESET_HELP = """\
Move a consumer group's last delivered id, as Kafka's offset reset does: the group's
consumers then read every entry after it again (they must be idempotent).
--to takes an entry id (<ms>-<seq>: entries after it are delivered), a time (ISO-8601,
UTC when no offset is given, or epoch milliseconds: entries at or after it are
delivered), 'beginning' or 'end' (only new entries).
Pending entries stay pending: the reset neither acknowledges nor re-delivers them;
consumers still claim them after the idle timeout.
"""


def register(commands: Any) -> None:
    """Add the ``streams``, ``dlq`` and ``group`` command groups."""
    streams = commands.add_parser("streams", help="inspect streams, groups and consumers")
    streams_sub = streams.add_subparsers(dest="streams_command", metavar="ACTION", required=True)
    info = streams_sub.add_parser(
        "info",
        help="length, memory, groups, lag, pending, consumers and dead letters",
        description="Describe streams: length, memory, first and last entry; per group "
        "lag, pending, oldest pending age, last delivered; per consumer pending and "
        "idle; dead-letter count. --json keys are documented in orderflow.bus.admin.info.",
    )
    info.add_argument(
        "--stream",
        dest="streams",
        action="append",
        metavar="STREAM",
        help="a stream to describe, repeatable "
        "(default: ORDERFLOW_STREAM and ORDERFLOW_EMAIL_EVENTS_STREAM)",
    )
    info.add_argument("--json", action="store_true", help="print JSON for scripts")
    info.set_defaults(handler=streams_info_command)

    dlq = commands.add_parser("dlq", help="list, replay or purge dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = dlq_sub.add_parser("list", help="show the oldest dead letters of a stream")
    _stream_option(listing)
    listing.add_argument(
        "--limit", type=_positive_int, default=20, help="most entries shown (default: 20)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    listing.set_defaults(handler=dlq_list_command)

    replay = dlq_sub.add_parser(
        "replay",
        help="republish dead letters to their source stream",
        description="Republish dead letters to their source stream with their original "
        "fields, deleting each from the dead letters in the same atomic step.",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (see dlq list)")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    _stream_option(replay)
    replay.set_defaults(handler=dlq_replay_command)

    purge = dlq_sub.add_parser("purge", help="delete dead letters for good")
    purge.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (see dlq list)")
    purge.add_argument("--all", action="store_true", help="delete every dead letter")
    purge.add_argument("--yes", action="store_true", help="do not ask before --all")
    _stream_option(purge)
    purge.set_defaults(handler=dlq_purge_command)

    group = commands.add_parser("group", help="steer consumer groups")
    group_sub = group.add_subparsers(dest="group_command", metavar="ACTION", required=True)
    reset = group_sub.add_parser(
        "reset",
        help="replay a group from a point (pending entries stay pending)",
        description=_RESET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reset.add_argument("group", metavar="GROUP", help="the consumer group")
    reset.add_argument(
        "--to", required=True, metavar="ID|TIME|beginning|end", help="where the group resumes"
    )
    reset.add_argument("--stream", help="the group's stream (default: ORDERFLOW_STREAM)")
    reset.set_defaults(handler=group_reset_command)


def _stream_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stream", help="the source stream whose dead letters to use (default: ORDERFLOW_STREAM)"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextmanager
def _operation_errors() -> Iterator[None]:
    """Bad arguments found by an operation exit 2; Redis refusing exits 1."""
    try:
        yield
    except ops.AmbiguousDeadLetter as exc:
        raise CommandError(_ambiguous(exc)) from None
    except ops.OperationError as exc:
        raise CommandError(str(exc)) from None
    except RedisError as exc:
        raise CommandError(f"Redis error: {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _ambiguous(exc: ops.AmbiguousDeadLetter) -> str:
    """The refusal, with the --stream values that would pick each partition."""
    found = "; ".join(
        f"{entry_id} is in {' and '.join(dlqs)} (--stream "
        + " or ".join(repr(dlq.removesuffix(DLQ_SUFFIX)) for dlq in dlqs)
        + ")"
        for entry_id, dlqs in exc.places.items()
    )
    return f"dead letter {found}: name the partition with --stream; nothing was done"


def _check_stream(name: str) -> str:
    try:
        StreamKeys(name)
    except ValueError as exc:
        raise UsageError(f"--stream: {exc}") from None
    return name


def _dlq_source(args: argparse.Namespace, settings: Settings) -> str:
    stream = _check_stream(args.stream or settings.stream)
    try:
        ops.dead_letter_stream(stream)
    except ValueError as exc:
        raise UsageError(f"--stream {exc}") from None
    return stream


def _ids(values: Sequence[str]) -> list[str]:
    try:
        return [ops.parse_entry_id(v) for v in values]
    except ValueError as exc:
        raise UsageError(f"ID {exc}") from None


def _ids_or_all(args: argparse.Namespace, action: str) -> list[str] | None:
    if args.all and args.ids:
        raise UsageError(f"dlq {action}: give either IDs or --all, not both")
    if not args.all and not args.ids:
        raise UsageError(f"dlq {action}: give the dead-letter IDs (see `dlq list`) or --all")
    return None if args.all else _ids(args.ids)


# -- streams info ----------------------------------------------------------------------


async def streams_info_command(args: argparse.Namespace) -> int:
    """Print what each stream holds and how far its groups are."""
    names = [_check_stream(s) for s in args.streams or []]
    settings = load_settings()
    names = list(dict.fromkeys(names or [settings.stream, settings.email_events_stream]))
    url = redact_url(resolve_redis_url(settings))
    async with redis_client(settings) as client:
        with _operation_errors():
            infos = await ops.stream_info(client, names)
            server = await server_info(client, _probe_stream(infos))
            versions = {name: await versions_in_flight(client, name) for name in names}
    if args.json:
        body = {
            "redis": url,
            "server": server.to_json(),
            "streams": [i.to_json() for i in infos],
            "versions_in_flight": versions,
        }
        print(json.dumps(body, indent=2))
        return 0
    console = _console()
    console.print(Text(_server_line(server)))
    rows = [(label, i) for whole in infos for label, i in _with_partitions(whole)]
    console.print(_streams_table(rows, url))
    if any(versions.values()):
        console.print(_versions_table(versions))
    groups = [(label, i, g) for label, i in rows for g in i.groups]
    if groups:
        console.print(_groups_table(groups))
    # Consumers serve every partition: shown once per stream, merged over partitions.
    consumers = [(i, g, c) for i in infos for g in i.groups for c in g.consumers]
    if consumers:
        console.print(_consumers_table(consumers))
    return 0


def _probe_stream(infos: Sequence[ops.StreamInfo]) -> str:
    """A Redis stream to probe the server's stream features on: an existing one if any."""
    for info in infos:
        for part in info.partitions or [info]:
            if part.exists:
                return part.name
    return infos[0].name


#: How ``streams info`` names each probed feature.
_FEATURES = {"xtrim_acked": "XTRIM … ACKED", "xinfo_lag": "lag in XINFO"}


def _server_line(server: ServerInfo) -> str:
    """``Server: valkey 9.1.2 (standalone); XTRIM … ACKED: no, lag in XINFO: yes``."""
    said = {True: "yes", False: "no", None: "unknown"}
    features = ", ".join(
        f"{_FEATURES.get(name, name)}: {said[value]}" for name, value in server.features.items()
    )
    return f"Server: {server.name} {server.version} ({server.mode}); {features}"


def _versions_table(versions: dict[str, dict[str, int]]) -> Table:
    """Event versions among each stream's newest entries (a rollout in progress)."""
    table = Table(title=f"Event versions in flight (newest {IN_FLIGHT_SAMPLE} entries)")
    for column in ("stream", "event", "entries"):
        table.add_column(column, justify="right" if column == "entries" else "left")
    for stream, counts in versions.items():
        for label, count in counts.items():
            table.add_row(stream, label, str(count))
    return table


def _with_partitions(info: ops.StreamInfo) -> list[tuple[str, ops.StreamInfo]]:
    """A stream's table rows: itself, then its partitions (indented) when it has some."""
    if not info.partitions:
        return [(info.name, info)]
    whole = f"{info.name} (Σ {len(info.partitions)} partitions)"
    return [(whole, info), *((f"  {p.name}", p) for p in info.partitions)]


def _table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str | Text]],
    *,
    right: Sequence[str] = (),
    whole: Sequence[str] = (),
) -> Table:
    """A table of plain text (never rich markup); ``whole`` columns (ids) never wrap.

    Other columns keep at least :data:`MIN_TEXT_WIDTH` characters on narrow screens.
    """
    table = Table(title=Text(title), title_justify="left")
    for index, header in enumerate(headers):
        if header in whole:
            width = max([len(header), *(len(row[index]) for row in rows)])
        else:
            width = min(MIN_TEXT_WIDTH, max([len(header), *(len(row[index]) for row in rows)]))
        table.add_column(
            header,
            justify="right" if header in right else "left",
            no_wrap=header in whole,
            min_width=width,
        )
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    return table


def _streams_table(infos: Sequence[tuple[str, ops.StreamInfo]], url: str) -> Table:
    rows: list[Sequence[str | Text]] = []
    for label, info in infos:
        if not info.exists:
            rows.append([label, "-", "-", "(no such stream)", "-", str(info.dead_letters)])
            continue
        rows.append(
            [
                label,
                str(info.length),
                _size(info.memory_bytes),
                info.first_entry_id or "-",
                info.last_entry_id or "-",
                Text(str(info.dead_letters), style="bold red" if info.dead_letters else ""),
            ]
        )
    return _table(
        f"Streams on {url}",
        ["stream", "length", "memory", "first entry", "last entry", "dlq"],
        rows,
        right=["length", "memory", "dlq"],
        whole=["stream", "length", "memory", "first entry", "last entry", "dlq"],
    )


def _groups_table(groups: Sequence[tuple[str, ops.StreamInfo, ops.GroupInfo]]) -> Table:
    rows = []
    for label, _info, group in groups:
        oldest = "-"
        if group.oldest_pending_age_ms is not None:
            oldest = f"{human_duration(group.oldest_pending_age_ms)} old"
            if group.oldest_pending_idle_ms is not None:
                oldest += f", idle {human_duration(group.oldest_pending_idle_ms)}"
        rows.append(
            [
                label,
                group.name,
                _lag(group),
                str(group.pending),
                oldest,
                group.last_delivered_id,
            ]
        )
    return _table(
        "Consumer groups",
        ["stream", "group", "lag", "pending", "oldest pending", "last delivered"],
        rows,
        right=["lag", "pending"],
        whole=["stream", "group", "lag", "last delivered"],
    )


def _consumers_table(
    consumers: Sequence[tuple[ops.StreamInfo, ops.GroupInfo, ops.ConsumerInfo]],
) -> Table:
    rows = [
        [
            info.name,
            group.name,
            consumer.name,
            str(consumer.pending),
            human_duration(consumer.idle_ms),
        ]
        for info, group, consumer in consumers
    ]
    return _table(
        "Consumers",
        ["stream", "group", "consumer", "pending", "idle"],
        rows,
        right=["pending", "idle"],
        whole=["stream", "group"],
    )


def _console() -> Console:
    """A console for stdout; tables sent to a pipe are not cut to 80 columns."""
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def _short_time(text: str | None) -> str:
    if not text:
        return "-"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _lag(group: ops.GroupInfo) -> str:
    if group.lag is None:
        return "unknown"
    return f"≥{group.lag}" if group.lag_source == "at-least" else str(group.lag)


def _size(size: int | None) -> str:
    return "-" if size is None else human_size(size)


# -- dead letters ----------------------------------------------------------------------


async def dlq_list_command(args: argparse.Namespace) -> int:
    """Print the oldest dead letters: ids, reason, deliveries, time, payload preview."""
    settings = load_settings()
    stream = _dlq_source(args, settings)
    async with redis_client(settings) as client:
        with _operation_errors():
            page = await ops.list_dead_letters(client, stream, limit=args.limit)
    if args.json:
        document = {
            "stream": page.stream,
            "dead_letter_stream": page.dead_letter_stream,
            "total": page.total,
            "entries": [entry.to_json() for entry in page.entries],
            "partitions": [
                {"dead_letter_stream": p.dead_letter_stream, "total": p.total}
                for p in page.partitions
            ],
        }
        print(json.dumps(document, indent=2))
        return 0
    console = _console()
    where = _dlq_place(page)
    if not page.entries:
        console.print(f"no dead letters in {where}", markup=False)
        return 0
    headers = ["id", "source id", "reason", "deliveries", "time", "payload"]
    rows = []
    for entry in page.entries:
        row = [
            entry.id,
            entry.source_id or "-",
            ops.preview(entry.reason or "-", 60),
            str(entry.deliveries) if entry.deliveries is not None else "-",
            _short_time(entry.time),
            entry.preview,
        ]
        if page.partitions:
            # Ids are per partition: the same id may be in two of them.
            row.insert(1, entry.dead_letter_stream)
        rows.append(row)
    if page.partitions:
        headers.insert(1, "dead-letter stream")
    table = _table(
        f"Dead letters in {where} (oldest first)",
        headers,
        rows,
        right=["deliveries"],
        whole=["id", "dead-letter stream", "source id", "deliveries"],
    )
    console.print(table)
    if page.total > len(page.entries):
        console.print(
            f"showing {len(page.entries)} of {page.total}; use --limit to see more", markup=False
        )
    return 0


def _dlq_place(page: ops.DeadLetterPage) -> str:
    if not page.partitions:
        return page.dead_letter_stream
    return f"{page.dead_letter_stream} ({len(page.partitions)} partitions)"


def _dlq_names(dlqs: Sequence[str]) -> str:
    """The dead-letter streams of a command's messages: one name, or how many."""
    if len(dlqs) == 1:
        return dlqs[0]
    return f"{len(dlqs)} partitions ({dlqs[0]} … {dlqs[-1]})"


async def dlq_replay_command(args: argparse.Namespace) -> int:
    """Republish dead letters to their source stream (partition), each moved atomically."""
    ids = _ids_or_all(args, "replay")
    settings = load_settings()
    stream = _dlq_source(args, settings)
    async with redis_client(settings) as client:
        with _operation_errors():
            where = _dlq_names(await ops.dead_letter_streams(client, stream))
            total = len(ids) if ids is not None else await ops.count_dead_letters(client, stream)
            with _progress(total) as advance:
                result = await ops.replay_dead_letters(client, stream, ids, progress=advance)
    for entry_id in result.unknown:
        print(
            f"orderflow: no dead letter {entry_id} in {where}; nothing done for it",
            file=sys.stderr,
        )
    for entry_id, why in result.failed.items():
        print(f"orderflow: could not replay {entry_id}: {why}", file=sys.stderr)
    count = result.count
    print(f"replayed {count} dead letter{'' if count == 1 else 's'} from {where}")
    return 1 if result.unknown or result.failed else 0


@contextmanager
def _progress(total: int) -> Iterator[ops.ProgressCallback | None]:
    """A progress bar on stderr when there are many and it is a terminal."""
    console = Console(stderr=True)
    if total <= PROGRESS_THRESHOLD or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("replay", total=total)
        yield lambda done: progress.update(task, completed=done)


async def dlq_purge_command(args: argparse.Namespace) -> int:
    """Delete dead letters; ``--all`` needs ``--yes`` or an interactive confirmation."""
    ids = _ids_or_all(args, "purge")
    interactive = sys.stdin.isatty()
    if ids is None and not args.yes and not interactive:
        raise UsageError("dlq purge --all deletes every dead letter: add --yes to confirm")
    settings = load_settings()
    stream = _dlq_source(args, settings)
    async with redis_client(settings) as client:
        with _operation_errors():
            where = _dlq_names(await ops.dead_letter_streams(client, stream))
            if ids is not None:
                result = await ops.purge_dead_letters(client, stream, ids)
            else:
                count = await ops.count_dead_letters(client, stream)
                # Only what exists now is purged (each partition up to its newest now),
                # so entries arriving while the operator reads the question are kept.
                snapshot = await ops.dead_letter_snapshot(client, stream)
                if not snapshot:
                    print(f"no dead letters in {where}")
                    return 0
                if not args.yes and not _confirm(f"Delete all {count} dead letters in {where}?"):
                    print("nothing purged")
                    return 1
                result = await ops.purge_all_dead_letters(client, stream, snapshot=snapshot)
    for entry_id in result.unknown:
        print(
            f"orderflow: no dead letter {entry_id} in {where}; nothing done for it",
            file=sys.stderr,
        )
    print(f"purged {result.deleted} dead letter{'' if result.deleted == 1 else 's'} from {where}")
    return 1 if result.unknown else 0


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


# -- group reset -----------------------------------------------------------------------


async def group_reset_command(args: argparse.Namespace) -> int:
    """Move a group's last delivered id to an id, a time, the beginning or the end.

    On a partitioned stream the group moves on every partition (where it exists).
    """
    group = args.group
    if not group or any(ch.isspace() for ch in group):
        raise UsageError(f"GROUP {group!r} must be non-empty, without spaces")
    try:
        position = ops.parse_position(args.to)
    except ValueError as exc:
        raise UsageError(f"--to {exc}") from None
    settings = load_settings()
    stream = _check_stream(args.stream or settings.stream)
    async with redis_client(settings) as client:
        with _operation_errors():
            try:
                done = await ops.reset_group(client, stream, group, position)
            except ops.PositionAfterEnd as exc:
                raise UsageError(f"--to {exc}") from None
    lag = "an unknown number of" if done.lag is None else str(done.lag)
    if len(done.resets) == 1 and not done.missing:
        (reset,) = done.resets
        print(
            f"group {group} on {reset.stream}: last delivered id {reset.previous_id} → "
            f"{reset.new_id} ({position.description}); {lag} entries to deliver"
        )
    else:
        for reset in done.resets:
            part_lag = "?" if reset.lag is None else str(reset.lag)
            print(
                f"  {reset.stream}: {reset.previous_id} → {reset.new_id}; "
                f"{part_lag} entries to deliver"
            )
        for name in done.missing:
            print(f"  {name}: no group {group} there, left as it is")
        moved = len(done.resets)
        print(
            f"group {group} on {stream}: moved on {moved} of {moved + len(done.missing)} "
            f"partitions to {position.description}; {lag} entries to deliver"
        )
    if done.pending:
        print(
            f"{done.pending} pending entries stay pending "
            "(claimed by consumers after the idle timeout)"
        )
    return 0
