"""`orderflow up` and `orderflow demo` on a fresh directory, as a new user runs them."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from orderflow.embedded.redis_server import free_port
from tests.support import clean_env, poll_until

pytestmark = pytest.mark.slow


def children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Up:
    def __init__(self, cwd: Path, port: int, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orderflow", "up", "--port", str(port), *args],
            cwd=cwd,
            env=clean_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.output):
            if self.proc.poll() is not None and self._lines.empty():
                raise AssertionError(f"up exited {self.proc.returncode}: {self.output}")
            try:
                self.output.append(self._lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {text!r} in {self.output}") from None

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._pump.join(timeout)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        while not self._lines.empty():
            self.output.append(self._lines.get())
        return code


def http(method: str, url: str, body: object = None) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status), json.loads(response.read())


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[Up, int]]:
    port = free_port()
    process = Up(tmp_path, port, "--workers", "1", "--status-interval", "0.5")
    yield process, port
    if process.proc.poll() is None:
        process.proc.kill()
        process.finish()


def test_up_runs_everything_in_an_empty_directory_and_stops_cleanly(
    up: tuple[Up, int], tmp_path: Path
) -> None:
    process, port = up
    process.wait_for("orderflow is up")
    api = f"http://127.0.0.1:{port}"
    assert http("GET", f"{api}/health")[0] == 200

    status, order = http("POST", f"{api}/orders", {"email": "alice@example.com", "total": "42.50"})
    assert status == 201
    mail = tmp_path / ".orderflow" / "mail" / "new"
    poll_until(lambda: mail.is_dir() and len(list(mail.iterdir())) == 1, 60, what="the email file")
    poll_until(
        lambda: http("GET", f"{api}/orders/{order['id']}")[1]["email_status"] == "sent",
        60,
        what="status sent",
    )
    text = next(mail.iterdir()).read_text()
    assert "alice@example.com" in text
    assert "42.50" in text

    metrics = urllib.request.urlopen(f"{api}/metrics", timeout=10).read().decode()
    assert 'orderflow_group_lag{group="email-service",stream="orders"} 0.0' in metrics
    assert 'orderflow_group_pending{group="email-service",stream="orders"} 0.0' in metrics
    assert 'orderflow_dead_letters{stream="orders"} 0.0' in metrics
    assert "orderflow_orders_created_total 1.0" in metrics
    process.wait_for("metrics on 127.0.0.1 ports")
    [workers_line] = [line for line in process.output if "metrics on 127.0.0.1 ports" in line]
    worker_port = workers_line.rsplit(" ", 1)[1]
    worker_metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{worker_port}/metrics", timeout=10
    ).read()
    assert b"orderflow_emails_sent_total 1.0" in worker_metrics
    assert b'orderflow_acked_total{group="email-service",stream="orders"} 1.0' in worker_metrics

    children = children_of(process.proc.pid)
    assert len(children) >= 4  # redis-server, mail sink, a worker, the API
    process.wait_for("emails in the Maildir 1")  # the live status line

    process.proc.send_signal(signal.SIGINT)
    assert process.finish() == 0
    assert "stopped cleanly" in process.output[-1]
    assert not [pid for pid in children if alive(pid)]
    assert not (tmp_path / ".orderflow" / "redis.url").exists()


def test_a_second_up_on_the_same_data_dir_is_refused(up: tuple[Up, int], tmp_path: Path) -> None:
    process, _ = up
    process.wait_for("orderflow is up")
    second = subprocess.run(
        [sys.executable, "-m", "orderflow", "up", "--port", str(free_port())],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already running on data dir" in second.stderr
    assert f"pid {process.proc.pid}" in second.stderr
    process.proc.send_signal(signal.SIGTERM)
    assert process.finish() == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers", "0"], "--workers must be between 1 and 64"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--workers", "many"], "invalid int value"),
    ],
)
def test_up_refuses_bad_arguments(tmp_path: Path, args: list[str], error: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orderflow", "up", *args],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert error in result.stderr
    assert not (tmp_path / ".orderflow").exists()


def test_demo_tells_the_labs_story_and_exits_0(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orderflow", "demo", "--timeout", "60"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✔ order #101 emails: 1" in result.stdout
    assert "✔ order #102 status: sent" in result.stdout
    assert "✔ Pub/Sub order #103 (fire and forget): lost" in result.stdout
    assert "✔ Streams order #104 (persisted, consumer group): delivered" in result.stdout


def test_demo_exits_non_zero_when_an_outcome_is_wrong(tmp_path: Path) -> None:
    # A From address that no email can carry: every send fails, so no order is emailed.
    result = subprocess.run(
        [sys.executable, "-m", "orderflow", "demo", "--timeout", "1"],
        cwd=tmp_path,
        env=clean_env(ORDERFLOW_MAIL_FROM="not an address"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "✘ order #101 emails: 0 (expected 1)" in result.stdout
    assert "some outcomes were wrong" in result.stdout
