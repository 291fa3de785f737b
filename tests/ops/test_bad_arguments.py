"""Every operator command: a bad argument exits 2 with a clear message, nothing changed."""

from __future__ import annotations

import pytest
import redis

from tests.ops.conftest import Cli, state

GROUP = "email-service"
STREAMS = ("orders", "email-events", "a b")

BAD = [
    # (arguments, a piece of the message)
    (["streams"], "ACTION"),
    (["streams", "info", "--stream", "a b"], "without spaces"),
    (["streams", "info", "--stream", ""], "non-empty"),
    (["streams", "info", "--bogus"], "unrecognized arguments"),
    (["dlq"], "ACTION"),
    (["dlq", "list", "--limit", "0"], "must be at least 1"),
    (["dlq", "list", "--limit", "many"], "not an integer"),
    (["dlq", "list", "--stream", "orders:dlq"], "names a dead-letter stream"),
    (["dlq", "replay"], "give the dead-letter IDs"),
    (["dlq", "replay", "--all", "{dlq_id}"], "either IDs or --all"),
    (["dlq", "replay", "abc"], "'abc' is not a stream entry id"),
    (["dlq", "replay", "{dlq_id}", "99999999999999999999999-0"], "out of range"),
    (["dlq", "replay", "--all", "--stream", "orders:dlq"], "names a dead-letter stream"),
    (["dlq", "replay", "--all", "--stream", "a b"], "without spaces"),
    (["dlq", "purge"], "give the dead-letter IDs"),
    (["dlq", "purge", "--all"], "add --yes"),
    (["dlq", "purge", "--all", "{dlq_id}", "--yes"], "either IDs or --all"),
    (["dlq", "purge", "{dlq_id}", "1-x"], "'1-x' is not a stream entry id"),
    (["group"], "ACTION"),
    (["group", "reset"], "GROUP"),
    (["group", "reset", GROUP], "--to"),
    (["group", "reset", GROUP, "--to", "yesterday"], "'yesterday' is not an entry id"),
    (["group", "reset", GROUP, "--to", "1-2-3"], "is not an entry id"),
    (["group", "reset", GROUP, "--to", "-5"], "is not an entry id"),
    (["group", "reset", GROUP, "--to", "1969-12-31T00:00:00Z"], "before 1970"),
    (["group", "reset", GROUP, "--to", "99999999999999999999"], "after the year 9999"),
    (["group", "reset", GROUP, "--to", "2999-01-01T00:00:00Z"], "after the newest entry"),
    (["group", "reset", GROUP, "--to", "99999999999999-0"], "after the newest entry"),
    (["group", "reset", GROUP, "--to", "18446744073709551616-0"], "out of range"),
    (["group", "reset", "a b", "--to", "end"], "without spaces"),
    (["group", "reset", GROUP, "--to", "end", "--stream", "a b"], "without spaces"),
]


@pytest.fixture
def busy(sync_redis: redis.Redis) -> str:
    """A stream with a group, pending entries and a dead letter; the dead letter's id."""
    for _ in range(3):
        sync_redis.xadd("orders", {"data": "{}"})
    sync_redis.xgroup_create("orders", GROUP, id="0")
    sync_redis.xreadgroup(GROUP, "c1", {"orders": ">"}, count=2)
    dead = sync_redis.xadd("orders:dlq", {"data": "{}", "dlq_stream": "orders"})
    return dead.decode()


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_exits_2_and_changes_nothing(
    cli: Cli, sync_redis: redis.Redis, busy: str, argv: list[str], message: str
) -> None:
    before = state(sync_redis, *STREAMS)

    result = cli(*(arg.replace("{dlq_id}", busy) for arg in argv))

    assert result.code == 2, result
    assert message in result.err
    assert "Traceback" not in result.err
    assert state(sync_redis, *STREAMS) == before
