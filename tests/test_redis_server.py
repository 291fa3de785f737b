"""The embedded redis-server harness: a start that fails leaves no server behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from orderflow.embedded.redis_server import RedisServer


def test_a_server_that_never_answers_is_not_left_running(tmp_path: Path) -> None:
    # It runs, but refuses the harness's PING without the password: start() gives up.
    server = RedisServer(tmp_path, appendonly=False, extra_args=["--requirepass", "secret"])
    with pytest.raises(RuntimeError, match="did not answer"):
        server.start(timeout=0.5)
    assert server.process is not None
    assert server.process.poll() is not None
