"""Worker processes (`orderflow email worker`), crashes, and the Maildir sink."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from orderflow.config import SMTP_URL_FILE, Settings
from orderflow.email import ledger_key
from orderflow.embedded.smtp_sink import SmtpSink
from orderflow.maildir import count_delivered, read_maildir
from tests.support import wait_until

from .conftest import (
    ServiceFactory,
    SmtpFixture,
    dead_letters,
    email_events,
    pending_count,
    publish_order,
    run_burst,
    start_cli,
)

MESSAGE_ID = "<order-101@orderflow.localhost>"


def _env(redis_url: str, smtp_url: str, data_dir: Path) -> dict[str, str]:
    return {
        "ORDERFLOW_REDIS_URL": redis_url,
        "ORDERFLOW_SMTP_URL": smtp_url,
        "ORDERFLOW_DATA_DIR": str(data_dir),
        "ORDERFLOW_CLAIM_IDLE_MS": "1000",
        "ORDERFLOW_MAX_DELIVERIES": "4",
        "ORDERFLOW_RETRY_BASE_MS": "200",
    }


async def _no_pending(redis: aioredis.Redis) -> bool:
    return await pending_count(redis) == 0


@pytest.mark.slow
async def test_worker_process_handles_plain_xadd_and_stops_cleanly_on_sigterm(
    redis_url: str,
    aredis: aioredis.Redis,
    smtp: SmtpFixture,
    tmp_path: Path,
    processes: list[asyncio.subprocess.Process],
) -> None:
    proc = await start_cli(
        processes,
        ["email", "worker", "--name", "w1", "--concurrency", "4"],
        _env(redis_url, smtp.url, tmp_path),
        tmp_path / "worker.log",
    )
    await aredis.xadd("orders", {"data": b'{"id":101,"email":"alice@example.com","total":100}'})
    await wait_until(lambda: len(smtp.handler.received) == 1)
    await wait_until(lambda: _no_pending(aredis))

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert smtp.handler.received[0].rcpt_tos == ["alice@example.com"]
    assert [e.type for e in await email_events(aredis)] == ["email.sent"]
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.chaos
async def test_worker_killed_while_sending_is_taken_over_and_sends_once(
    redis_url: str,
    aredis: aioredis.Redis,
    smtp: SmtpFixture,
    settings: Settings,
    make_service: ServiceFactory,
    tmp_path: Path,
    processes: list[asyncio.subprocess.Process],
) -> None:
    # The server leaves the first DATA hanging: the worker is killed mid-send.
    smtp.handler.stall_next = 1
    proc = await start_cli(
        processes,
        ["email", "worker", "--name", "doomed"],
        _env(redis_url, smtp.url, tmp_path),
        tmp_path / "worker.log",
    )
    await publish_order(aredis, {"id": 101, "email": "alice@example.com", "total": 100})
    await asyncio.wait_for(smtp.handler.stalled.wait(), 15)
    # While it sends, the order is leased in the ledger.
    assert await aredis.hget(ledger_key(101), "state") == b"sending"
    os.kill(proc.pid, signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL

    survivor = await make_service()
    task = asyncio.create_task(survivor.run())
    await wait_until(lambda: len(smtp.handler.received) == 1, timeout=15)
    await wait_until(lambda: _no_pending(aredis), timeout=10)
    survivor.stop()
    await asyncio.wait_for(task, 10)

    assert survivor.worker.stats.claimed == 1
    assert len(smtp.handler.with_message_id(MESSAGE_ID)) == 1
    assert smtp.handler.data_attempts == 2  # the stalled one never got a 250
    assert await dead_letters(aredis) == []
    assert [e.type for e in await email_events(aredis)] == ["email.sent"]
    assert await aredis.hget(ledger_key(101), "state") == b"sent"


async def test_sink_stores_messages_in_the_maildir(
    aredis: aioredis.Redis, settings: Settings, make_service: ServiceFactory, tmp_path: Path
) -> None:
    maildir = tmp_path / "mail"
    async with SmtpSink(maildir, port=0) as sink:
        sink_settings = settings.model_copy(update={"smtp_url": SecretStr(sink.url)})
        await publish_order(aredis, {"id": 101, "email": "alice@example.com", "total": 100})
        await publish_order(aredis, {"id": 102, "email": "ünïcode@exämple.com", "total": 5})
        await run_burst(await make_service(sink_settings))
        assert sink.delivered == 2

    assert len(list((maildir / "new").iterdir())) == 2
    assert count_delivered(maildir) == 2
    (alice,) = read_maildir(maildir, MESSAGE_ID)
    assert alice["Delivered-To"] == "alice@example.com"
    assert alice["Subject"] == "Order #101 confirmed"
    (utf8,) = read_maildir(maildir, "<order-102@orderflow.localhost>")
    assert utf8["Delivered-To"] == "ünïcode@exämple.com"


@pytest.mark.slow
async def test_mail_sink_command(
    tmp_path: Path, processes: list[asyncio.subprocess.Process], make_service: ServiceFactory
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    proc = await start_cli(
        processes,
        ["mail", "sink", "--port", "0"],
        {"ORDERFLOW_DATA_DIR": str(data_dir)},
        tmp_path / "sink.log",
    )
    url_file = data_dir / SMTP_URL_FILE
    url = url_file.read_text().strip()
    assert url.startswith("smtp://127.0.0.1:")

    from orderflow.email import SmtpSender

    from .test_sender import send

    sender = SmtpSender(url)
    await send(sender, 101)
    await sender.close()
    assert count_delivered(data_dir / "mail", MESSAGE_ID) == 1

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert not url_file.exists()
