"""`orders serve --host` reaches the app's settings, so the console knows where it is bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orderflow.embedded.redis_server import free_port

pytestmark = pytest.mark.slow


def test_serving_beyond_loopback_without_a_token_turns_the_console_off(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERFLOW_")}
    env.update(ORDERFLOW_REDIS_URL=redis_url, ORDERFLOW_DATA_DIR=str(tmp_path))
    command = ["orders", "serve", "--host", "0.0.0.0", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "orderflow", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("the Order Service did not start") from None
                time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert refused.value.code == 403
        assert "beyond loopback" in refused.value.read().decode()
        refused.value.close()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
