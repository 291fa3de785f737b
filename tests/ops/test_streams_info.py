"""``orderflow streams info``: what it reports is what Redis reports."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from tests.ops.conftest import Cli


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _setup_busy_stream(client: redis.Redis) -> None:
    """orders: 6 entries, group email-service (consumer c1 holds 2 pending, c2 none,
    one entry acked, 3 unread), group audit (nothing read); 2 dead letters."""
    for i in range(6):
        client.xadd("orders", {"data": f'{{"id": {i}}}'})
    client.xgroup_create("orders", "email-service", id="0")
    client.xgroup_create("orders", "audit", id="0")
    client.xreadgroup("email-service", "c1", {"orders": ">"}, count=3)
    first: Any = client.xrange("orders", count=1)[0][0]
    client.xack("orders", "email-service", first)
    client.xgroup_createconsumer("orders", "email-service", "c2")
    for i in range(2):
        client.xadd("orders:dlq", {"data": "{}", "dlq_reason": f"bad {i}", "dlq_stream": "orders"})


def test_json_matches_what_redis_reports(cli: Cli, sync_redis: redis.Redis) -> None:
    _setup_busy_stream(sync_redis)
    before_ms = _server_ms(sync_redis)

    result = cli("streams", "info", "--json")
    after_ms = _server_ms(sync_redis)

    assert result.code == 0, result.err
    report = json.loads(result.out)
    by_name = {s["name"]: s for s in report["streams"]}
    # The defaults: the orders stream and the email events stream (absent here).
    assert list(by_name) == ["orders", "email-events"]
    assert by_name["email-events"]["exists"] is False
    assert by_name["email-events"]["length"] == 0
    assert by_name["email-events"]["groups"] == []

    orders = by_name["orders"]
    redis_groups = {g["name"].decode(): g for g in sync_redis.xinfo_groups("orders")}
    # XINFO reports lag, entries read and added on Redis 7.0+, not on 6.2: asked, not guessed.
    reported = "lag" in redis_groups["audit"]
    rows = sync_redis.xrange("orders")
    assert orders["exists"] is True
    assert orders["length"] == sync_redis.xlen("orders") == 6
    assert orders["memory_bytes"] == sync_redis.memory_usage("orders")
    assert orders["first_entry_id"] == rows[0][0].decode()
    assert orders["last_entry_id"] == rows[-1][0].decode()
    assert orders["last_generated_id"] == rows[-1][0].decode()
    assert orders["entries_added"] == (6 if reported else None)
    assert orders["dead_letter_stream"] == "orders:dlq"
    assert orders["dead_letters"] == sync_redis.xlen("orders:dlq") == 2

    groups = {g["name"]: g for g in orders["groups"]}
    assert set(groups) == set(redis_groups) == {"email-service", "audit"}
    for name, group in groups.items():
        expected = redis_groups[name]
        assert group["pending"] == expected["pending"]
        assert group["last_delivered_id"] == expected["last-delivered-id"].decode()
        assert group["entries_read"] == expected.get("entries-read")
        assert group["lag"] == expected.get("lag", group["lag"])
        assert group["lag_source"] == ("redis" if reported else "counted")

    service = groups["email-service"]
    summary = sync_redis.xpending("orders", "email-service")
    assert service["pending"] == summary["pending"] == 2
    assert service["lag"] == 3
    oldest = summary["min"].decode()
    assert service["oldest_pending_id"] == oldest
    assert service["oldest_pending_consumer"] == "c1"
    assert service["oldest_pending_deliveries"] == 1
    oldest_ms = int(oldest.split("-")[0])
    assert before_ms - oldest_ms <= service["oldest_pending_age_ms"] <= after_ms - oldest_ms
    (row,) = sync_redis.xpending_range("orders", "email-service", oldest, oldest, 1)
    assert 0 <= service["oldest_pending_idle_ms"] <= row["time_since_delivered"]
    consumers = {c["name"]: c for c in service["consumers"]}
    redis_consumers = {
        c["name"].decode(): c for c in sync_redis.xinfo_consumers("orders", "email-service")
    }
    assert set(consumers) == set(redis_consumers) == {"c1", "c2"}
    for name, consumer in consumers.items():
        assert consumer["pending"] == redis_consumers[name]["pending"]
        assert 0 <= consumer["idle_ms"] <= redis_consumers[name]["idle"]
    assert consumers["c1"]["pending"] == 2
    assert consumers["c2"]["pending"] == 0

    audit = groups["audit"]
    assert audit["pending"] == 0
    assert audit["lag"] == 6
    assert audit["oldest_pending_id"] is None
    assert audit["oldest_pending_age_ms"] is None
    assert audit["consumers"] == []


def test_lag_is_counted_when_redis_cannot_tell(cli: Cli, sync_redis: redis.Redis) -> None:
    ids = [sync_redis.xadd("orders", {"data": "{}"}) for _ in range(5)]
    sync_redis.xgroup_create("orders", "email-service", id="0")
    # A deletion in the middle plus a moved group: Redis 7 reports the lag as nil.
    sync_redis.xdel("orders", ids[2])
    sync_redis.xgroup_setid("orders", "email-service", ids[0])
    (redis_group,) = sync_redis.xinfo_groups("orders")
    if redis_group.get("lag") is not None:
        pytest.skip("this Redis knows the lag even here")

    result = cli("streams", "info", "--stream", "orders", "--json")

    assert result.code == 0, result.err
    (group,) = json.loads(result.out)["streams"][0]["groups"]
    assert group["lag"] == 3  # ids[1], ids[3], ids[4]
    assert group["lag_source"] == "counted"


def test_streams_are_chosen_with_repeated_stream_options(cli: Cli, sync_redis: redis.Redis) -> None:
    sync_redis.xadd("a", {"data": "{}"})
    sync_redis.xadd("b", {"data": "{}"})
    sync_redis.xadd("b", {"data": "{}"})

    result = cli("streams", "info", "--stream", "b", "--stream", "a", "--json")

    assert result.code == 0, result.err
    streams: list[dict[str, Any]] = json.loads(result.out)["streams"]
    assert [(s["name"], s["length"]) for s in streams] == [("b", 2), ("a", 1)]


def test_table_shows_streams_groups_consumers_and_no_password(
    cli: Cli,
    sync_redis: redis.Redis,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _setup_busy_stream(sync_redis)
    # The default user has no password, so Redis accepts any: a URL with a secret in it.
    monkeypatch.setenv(
        "ORDERFLOW_REDIS_URL", redis_url.replace("redis://", "redis://default:s3cret-pw@")
    )

    result = cli("streams", "info")

    assert result.code == 0, result.err
    assert "s3cret-pw" not in result.out + result.err
    assert "default:***@" in result.out
    for text in ("orders", "email-events", "no such stream", "email-service", "audit", "c1"):
        assert text in result.out
    assert "oldest pending" in result.out
    assert sync_redis.xrange("orders")[-1][0].decode() in result.out


def test_a_key_that_is_not_a_stream_is_an_error(cli: Cli, sync_redis: redis.Redis) -> None:
    sync_redis.set("orders", "not a stream")

    result = cli("streams", "info", "--stream", "orders")

    assert result.code == 1
    assert "'orders' is a string, not a stream" in result.err


def test_versions_in_flight_are_counted_during_a_rollout(cli: Cli, sync_redis: redis.Redis) -> None:
    data = b'{"id": 1, "email": "a@example.com", "total": 1}'
    v2 = "urn:orderflow:schema:order.created:2"
    sync_redis.xadd("orders", {"data": data})
    sync_redis.xadd("orders", {"data": data, "ce_dataschema": v2})
    sync_redis.xadd("orders", {"data": data, "ce_dataschema": v2})

    result = cli("streams", "info", "--json")

    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["versions_in_flight"] == {
        "orders": {"order.created v1": 1, "order.created v2": 2},
        "email-events": {},
    }
    table = cli("streams", "info")
    assert "order.created v2" in table.out
