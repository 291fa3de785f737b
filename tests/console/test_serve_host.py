"""`orders serve --host` reaches the app's settings, so the console knows where it is bound."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orderflow.embedded.redis_server import free_port
from tests.support import clean_env, poll_until

pytestmark = pytest.mark.slow


def test_serving_beyond_loopback_without_a_token_turns_the_console_off(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = clean_env(ORDERFLOW_REDIS_URL=redis_url, ORDERFLOW_DATA_DIR=str(tmp_path))
    command = ["orders", "serve", "--host", "0.0.0.0", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "orderflow", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(lambda: _answers(port) or server.poll() is not None, 60, what="the service")
        assert server.poll() is None, "the Order Service exited at start"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert refused.value.code == 403
        assert "beyond loopback" in refused.value.read().decode()
        refused.value.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False
