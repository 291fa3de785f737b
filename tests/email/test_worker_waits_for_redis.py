"""An email worker started before Redis waits for it; a misconfigured one fails at once."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from orderflow.bus import connect
from orderflow.embedded.redis_server import RedisServer, free_port
from tests.support import wait_until

from .conftest import ORDERFLOW, SmtpFixture

pytestmark = pytest.mark.slow


async def _spawn(
    processes: list[asyncio.subprocess.Process], redis_url: str, smtp_url: str, tmp: Path
) -> tuple[asyncio.subprocess.Process, Path]:
    log = tmp / "worker.log"
    env = {
        **os.environ,
        "ORDERFLOW_REDIS_URL": redis_url,
        "ORDERFLOW_SMTP_URL": smtp_url,
        "ORDERFLOW_DATA_DIR": str(tmp),
    }
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            str(ORDERFLOW),
            "email",
            "worker",
            "--name",
            "early",
            env=env,
            stdout=out,
            stderr=out,
        )
    processes.append(proc)
    return proc, log


async def test_worker_started_before_redis_waits_then_sends(
    smtp: SmtpFixture, tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port(), appendonly=False)
    proc, log = await _spawn(processes, server.url, smtp.url, tmp_path)
    try:
        # It says it is waiting (naming the URL, not a password) and keeps running.
        await wait_until(lambda: "waiting for it" in log.read_text(), 20)
        assert proc.returncode is None
        assert server.url.split("//")[1] in log.read_text()

        await asyncio.to_thread(server.start)
        client = connect(server.url)
        try:
            await wait_until(lambda: "consuming 'orders'" in log.read_text(), 20)
            await client.xadd(
                "orders", {"data": b'{"id":7,"email":"early@example.com","total":"5.00"}'}
            )
            await wait_until(lambda: len(smtp.handler.received) == 1, 20)
        finally:
            await client.aclose()
        assert smtp.handler.received[0].rcpt_tos == ["early@example.com"]
        assert "reachable after" in log.read_text()

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()


async def test_worker_waiting_for_redis_stops_on_sigterm(
    smtp: SmtpFixture, tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc, log = await _spawn(processes, url, smtp.url, tmp_path)
    await wait_until(lambda: "waiting for it" in log.read_text(), 20)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert "Traceback" not in log.read_text()


async def test_worker_with_a_wrong_password_fails_at_once(
    smtp: SmtpFixture, tmp_path: Path, processes: list[asyncio.subprocess.Process]
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False)
    server.start()
    try:
        admin = connect(server.url)
        await admin.config_set("requirepass", "right-secret")
        await admin.aclose()
        url = server.url.replace("redis://", "redis://:wrong-secret@")
        proc, log = await _spawn(processes, url, smtp.url, tmp_path)
        assert await asyncio.wait_for(proc.wait(), 20) == 1
    finally:
        server.stop()
    text = log.read_text()
    assert "cannot reach Redis" in text
    assert "waiting for it" not in text
    assert "wrong-secret" not in text
