"""The mutation runner's pool of redis-servers (tests/support/redis_pool.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from orderflow.embedded.redis_server import RedisServer
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


ORPHANING = """
import subprocess, sys
from orderflow.embedded.redis_server import RedisServer
from tests.support import redis_pool

assert redis_pool.adopt_orphans()
kept = RedisServer(sys.argv[1] + "/kept", appendonly=False)
kept.start()
# A session stopped at its deadline: it started a server and ended without stopping it.
subprocess.run([sys.executable, "-c", (
    "import os, sys\\n"
    "from orderflow.embedded.redis_server import RedisServer\\n"
    "s = RedisServer(sys.argv[1] + '/left', appendonly=False)\\n"
    "s.start()\\n"
    "print(s.pid, flush=True)\\n"
    "os._exit(1)\\n"
), sys.argv[1]], check=False, stdout=sys.stdout)
print(redis_pool.orphans_of(kept.pid) == [], flush=True)  # not the kept one's child
print(redis_pool.kill_orphans({kept.pid}), flush=True)
print(redis_pool.kill_orphans({kept.pid}), kept.process.poll() is None, flush=True)
kept.stop()
"""


def test_the_runner_finds_and_kills_the_servers_a_stopped_session_left(tmp_path: Path) -> None:
    """A server left by a session that ended (``os._exit``) comes back to the runner,
    which kills it and no other: not the ones it keeps, not anybody else's."""
    bystander = RedisServer(tmp_path / "bystander", appendonly=False)
    bystander.start()
    try:
        run = subprocess.run(
            [sys.executable, "-c", ORPHANING, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=60,
        )
        left, nothing_else, killed, again = run.stdout.split("\n", 3)
        assert (nothing_else, killed) == ("True", "1"), run.stdout
        assert again.split() == ["0", "True"]  # gone, and the kept one still running
        assert not Path(f"/proc/{int(left)}").exists()
        assert bystander.process is not None
        assert bystander.process.poll() is None
    finally:
        bystander.stop()
