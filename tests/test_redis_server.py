"""The embedded redis-server harness: a start that fails leaves no server behind, and a
port lost before the server bound it is picked again."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from orderflow.embedded.redis_server import RedisServer, free_port


def test_a_server_that_never_answers_is_not_left_running(tmp_path: Path) -> None:
    # It runs, but refuses the harness's PING without the password: start() gives up.
    server = RedisServer(tmp_path, appendonly=False, extra_args=["--requirepass", "secret"])
    with pytest.raises(RuntimeError, match="did not answer"):
        server.start(timeout=0.5)
    assert server.process is not None
    assert server.process.poll() is not None


def _squat(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_port_it_picked_and_lost_before_binding_is_picked_again(tmp_path: Path) -> None:
    """Between picking a free port and the server binding it, another process may take
    it (with pytest-xdist, another worker's connection did): the start tries a new one."""
    server = RedisServer(tmp_path, appendonly=False)
    lost = server.port
    with _squat(lost):
        server.start()
    try:
        assert server.port != lost
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def test_a_port_the_caller_gave_is_not_changed(tmp_path: Path) -> None:
    port = free_port()
    server = RedisServer(tmp_path, port=port, appendonly=False)
    with _squat(port), pytest.raises(RuntimeError, match="Address already in use"):
        server.start()
    assert server.port == port
    assert server.process is not None
    assert server.process.poll() is not None
