"""Real processes: the CLI's serve, relay and create, SIGKILL between commit and publish."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from orderflow.cli import main
from orderflow.embedded.redis_server import free_port
from tests.support import clean_env, clear_orderflow_env, order_body, wait_until

from .conftest import stream_events

ORDERFLOW = str(Path(sys.executable).parent / "orderflow")


def _env(database_url: str, redis_url: str, data_dir: Path) -> dict[str, str]:
    return clean_env(
        ORDERFLOW_DATABASE_URL=database_url,
        ORDERFLOW_REDIS_URL=redis_url,
        ORDERFLOW_DATA_DIR=str(data_dir),
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed at the end if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


def _start(
    processes: list[subprocess.Popen[bytes]], env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [ORDERFLOW, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    processes.append(process)
    return process


async def _serving(client: httpx.AsyncClient, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"serve exited: {process.stderr.read().decode()[-2000:]}")
    try:
        return (await client.get("/health")).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
@pytest.mark.chaos
async def test_server_killed_after_commit_loses_no_event(
    database_url: str,
    redis_url: str,
    tmp_path: Path,
    aredis: Any,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    env = _env(database_url, redis_url, tmp_path)
    port = free_port()
    # No relay in the server: every commit is followed by a death before any publish.
    server = _start(processes, env, "orders", "serve", "--port", str(port), "--no-relay")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        await wait_until(lambda: _serving(client, server), timeout=30, interval=0.1)
        ids = []
        for n in range(5):
            response = await client.post("/orders", json=order_body(n))
            assert response.status_code == 201
            ids.append(response.json()["id"])
    server.send_signal(signal.SIGKILL)
    assert server.wait(10) == -signal.SIGKILL
    assert await aredis.exists("orders") == 0

    relay = _start(processes, env, "relay")
    await wait_until(lambda: _stream_length(aredis, 5), timeout=30, interval=0.05)
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(15) == 0, relay.stderr.read().decode()[-2000:]
    assert [event["id"] for event in await stream_events(aredis)] == ids


async def _stream_length(client: Any, n: int) -> bool:
    return bool(await client.xlen("orders") >= n)


@pytest.mark.slow
async def test_serve_publishes_and_stops_cleanly_on_sigterm(
    redis_url: str, tmp_path: Path, aredis: Any, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = _env(f"sqlite:///{tmp_path}/orders.db", redis_url, tmp_path)
    port = free_port()
    server = _start(processes, env, "orders", "serve", "--port", str(port))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        await wait_until(lambda: _serving(client, server), timeout=30, interval=0.1)
        response = await client.post("/orders", json=order_body(id=42))
        assert response.status_code == 201
        await wait_until(lambda: aredis.xlen("orders"), timeout=5)
    server.send_signal(signal.SIGTERM)
    assert server.wait(15) == 0, server.stderr.read().decode()[-2000:]


# -- orderflow orders create (in process: main() is the whole command) --------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> str:
    """Environment of an in-process ``orderflow`` run; returns the database URL."""
    clear_orderflow_env(monkeypatch)
    database_url = f"sqlite:///{tmp_path}/orders.db"
    monkeypatch.setenv("ORDERFLOW_DATABASE_URL", database_url)
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", redis_url)
    monkeypatch.setenv("ORDERFLOW_DATA_DIR", str(tmp_path))
    return database_url


def _events(redis_url: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [orjson.loads(fields[b"data"]) for _, fields in client.xrange("orders")]
    finally:
        client.close()


@pytest.mark.usefixtures("cli_env")
def test_create_prints_the_order_and_publishes_it_at_once(
    capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    args = ["orders", "create", "--email", "alice@example.com", "--total", "100", "--id", "101"]
    assert main(args) == 0

    order = orjson.loads(capsys.readouterr().out)
    assert order["id"] == 101
    assert order["total"] == "100.00"
    assert order["currency"] == "USD"
    assert order["last_published_at"] is not None
    assert _events(redis_url) == [
        {
            "customer": {"email": order["email"]},
            "lines": order["items"],
            **{key: order[key] for key in ("id", "total", "currency", "created_at")},
        }
    ]

    # The same order again: the same order printed, no second event.
    assert main(args) == 0
    assert orjson.loads(capsys.readouterr().out)["created_at"] == order["created_at"]
    assert len(_events(redis_url)) == 1

    # The same id, another order: refused.
    conflicting = ["orders", "create", "--email", "bob@example.com", "--total", "5", "--id", "101"]
    assert main(conflicting) == 1
    assert "101" in capsys.readouterr().err


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(
    "args",
    [
        ["--email", "not-an-address", "--total", "1"],
        ["--email", "a@example.com\r\nBcc: x@evil.test", "--total", "1"],
        ["--email", "a@example.com", "--total", "-1"],
        ["--email", "a@example.com", "--total", "1.001"],
        ["--email", "a@example.com", "--total", "1", "--id", "x"],
        ["--email", "a@example.com", "--total", "1", "--id", "0"],
        ["--email", "a@example.com", "--total", "1", "--currency", "XYZ"],
    ],
    ids=[
        "email",
        "email-crlf",
        "total-negative",
        "total-decimals",
        "id-text",
        "id-zero",
        "currency",
    ],
)
def test_create_with_bad_arguments_exits_2_and_stores_nothing(
    args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["orders", "create", *args])
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "orders.db").exists()


def test_create_with_redis_down_keeps_the_order_for_the_relay(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["orders", "create", "--email", "a@example.com", "--total", "3"]) == 0
    captured = capsys.readouterr()
    assert orjson.loads(captured.out)["last_published_at"] is None
    assert "not published" in captured.err or "publishes it later" in captured.err


@pytest.mark.slow
async def test_serve_with_two_workers_shares_the_outbox(
    redis_url: str, tmp_path: Path, aredis: Any, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = _env(f"sqlite:///{tmp_path}/orders.db", redis_url, tmp_path)
    port = free_port()
    server = _start(processes, env, "orders", "serve", "--port", str(port), "--workers", "2")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        await wait_until(lambda: _serving(client, server), timeout=30, interval=0.1)
        ids = []
        for n in range(20):
            response = await client.post("/orders", json=order_body(n))
            assert response.status_code == 201
            ids.append(response.json()["id"])
    assert len(set(ids)) == 20
    await wait_until(lambda: _stream_length(aredis, 20), timeout=10)
    assert sorted(event["id"] for event in await stream_events(aredis)) == sorted(ids)
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0


@pytest.mark.slow
async def test_serve_with_two_workers_serves_one_set_of_metrics(
    redis_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = _env(f"sqlite:///{tmp_path}/orders.db", redis_url, tmp_path)
    port = free_port()
    server = _start(processes, env, "orders", "serve", "--port", str(port), "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        await wait_until(lambda: _serving(client, server), timeout=30, interval=0.1)
    # A new connection per request, so both workers take orders.
    for n in range(30):
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            assert (await client.post("/orders", json=order_body(n))).status_code == 201
    [metrics_dir] = tmp_path.glob("metrics-*")
    counter_files = list(metrics_dir.glob("counter_*.db"))
    assert len(counter_files) == 2, counter_files  # one per worker process
    # Whichever worker answers, /metrics counts every worker's orders.
    for _ in range(6):
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            text = (await client.get("/metrics")).text
        assert "orderflow_orders_created_total 30.0" in text, text[:2000]
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert not metrics_dir.exists()  # removed on exit
