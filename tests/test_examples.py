"""The day-14 examples run as the lab describes, and interoperate with the lab's scripts."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orderflow.embedded.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "day14"
LAB = Path(__file__).with_name("lab")

# Points the lab's hard-coded `redis.Redis(host='localhost', port=6379)` at the test
# server, without touching the lab's scripts.
SHIM = """
import os
import redis
_init = redis.Redis.__init__
def _to_test_server(self, *args, **kwargs):
    kwargs.update(host="127.0.0.1", port=int(os.environ["LAB_REDIS_PORT"]))
    _init(self, *args, **kwargs)
redis.Redis.__init__ = _to_test_server
"""


class Process:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, script: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", script.name],
            cwd=script.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {text!r} in {self.seen}")
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue

    def finish(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        self._pump_thread.join(timeout)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.finish()


@pytest.fixture
def env(redis_url: str, shared_redis: RedisServer, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(SHIM)
    values = dict(os.environ)
    values["ORDERFLOW_REDIS_URL"] = redis_url
    values["LAB_REDIS_PORT"] = str(shared_redis.port)
    values["PYTHONPATH"] = os.pathsep.join([str(tmp_path), values.get("PYTHONPATH", "")])
    return values


def run(script: Path, env: dict[str, str]) -> Process:
    return Process(script, env)


def received(process: Process) -> list[str]:
    return [line for line in process.seen if line.startswith("✅ Received Event")]


def test_streams_example_delivers_orders_published_while_the_subscriber_was_down(
    env: dict[str, str],
) -> None:
    publisher = run(EXAMPLES / "streams" / "publisher.py", env)
    assert publisher.finish() == 0
    subscriber = run(EXAMPLES / "streams" / "subscriber.py", env)
    subscriber.wait_for("Order #102")
    assert subscriber.stop() == 0
    assert received(subscriber) == [
        "✅ Received Event: Order #101 for alice@example.com",
        "✅ Received Event: Order #102 for bob@example.com",
    ]


def test_pubsub_example_loses_orders_published_while_the_subscriber_was_down(
    env: dict[str, str],
) -> None:
    missed = run(EXAMPLES / "pubsub" / "publisher.py", env)
    assert missed.finish() == 0
    assert "(0 subscriber(s) listening)" in missed.seen[1]
    subscriber = run(EXAMPLES / "pubsub" / "subscriber.py", env)
    subscriber.wait_for("listening")
    publisher = run(EXAMPLES / "pubsub" / "publisher.py", env)
    assert publisher.finish() == 0
    subscriber.wait_for("Order #102")
    assert subscriber.stop() == 0
    assert len(received(subscriber)) == 2  # only the second run's orders


def test_the_labs_own_subscriber_receives_from_orderflow(env: dict[str, str]) -> None:
    lab_subscriber = run(LAB / "subscriber.py", env)
    lab_subscriber.wait_for("listening")
    publisher = run(EXAMPLES / "pubsub" / "publisher.py", env)
    assert publisher.finish() == 0
    lab_subscriber.wait_for("Order #102")
    lab_subscriber.stop()
    assert received(lab_subscriber) == [
        "✅ Received Event: Order #101 for alice@example.com",
        "✅ Received Event: Order #102 for bob@example.com",
    ]


def test_orderflow_receives_from_the_labs_own_publisher(env: dict[str, str]) -> None:
    subscriber = run(EXAMPLES / "pubsub" / "subscriber.py", env)
    subscriber.wait_for("listening")
    lab_publisher = run(LAB / "publisher.py", env)
    assert lab_publisher.finish() == 0
    subscriber.wait_for("Order #102")
    assert subscriber.stop() == 0
    assert received(subscriber) == [
        "✅ Received Event: Order #101 for alice@example.com",
        "✅ Received Event: Order #102 for bob@example.com",
    ]
