"""The mutation runner's pool of redis-servers (tests/support/redis_pool.py)."""

from __future__ import annotations

from pathlib import Path

import redis

from tests.support import redis_pool


def test_a_pool_lends_each_server_to_one_session_at_a_time_emptied(tmp_path: Path) -> None:
    servers = redis_pool.start_pool(tmp_path / "pool", 2)
    try:
        first = redis_pool.borrow(tmp_path / "pool")
        second = redis_pool.borrow(tmp_path / "pool")
        assert first is not None
        assert second is not None
        assert first.port != second.port
        assert {first.port, second.port} == {s.port for s in servers}
        # Both held: nothing left to lend.
        assert redis_pool.borrow(tmp_path / "pool") is None
        client = redis.Redis.from_url(first.url)
        client.set("left", "behind")
        sha = client.script_load("return 1")
        client.incr("counted")
        redis_pool.give_back(first)
        again = redis_pool.borrow(tmp_path / "pool")
        assert again is not None
        assert again.port == first.port
        # As new: no keys, no cached script, no statistics of the last session.
        assert client.dbsize() == 0
        assert client.script_exists(sha) == [False]
        assert "cmdstat_incr" not in client.info("commandstats")
        client.close()
        redis_pool.give_back(again)
        redis_pool.give_back(second)
    finally:
        redis_pool.stop_pool(servers)
