"""The embedded SMTP sink: 250 only once the message is durable, flushes grouped."""

from __future__ import annotations

import asyncio
import os
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from orderflow.embedded.smtp_sink import MaildirHandler, SmtpSink, read_maildir
from tests.support import wait_until


def _message(n: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "orders@orderflow.localhost"
    message["To"] = f"buyer{n}@example.com"
    message["Subject"] = f"Order #{n}"
    message["Message-ID"] = f"<order-{n}@orderflow.localhost>"
    message.set_content(f"order {n}")
    return message


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-per-file"])
async def test_no_250_before_the_message_and_its_rename_are_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    maildir = tmp_path / "mail"
    sink = SmtpSink(maildir, port=0)
    handler: MaildirHandler = sink.handler
    if not syncfs:
        handler._syncfs = None
    elif handler._syncfs is None:
        pytest.skip("no syncfs on this platform")
    events: list[str] = []
    entered = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # The flush of new/ (the renames) is the last step before the 250.
        is_dir = (
            os.path.isdir(f"/proc/self/fd/{fd}")
            or Path(os.readlink(f"/proc/self/fd/{fd}")) == maildir / "new"
        )
        events.append("fsync new/" if is_dir else "fsync file")
        if is_dir:
            entered.set()
            assert release.wait(30)
        real_fsync(fd)

    real_sync = handler._sync_filesystem

    def sync_filesystem() -> None:
        events.append("syncfs")
        real_sync()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(handler, "_sync_filesystem", sync_filesystem)
    async with sink:
        sends = [
            asyncio.create_task(aiosmtplib.send(_message(n), hostname=sink.host, port=sink.port))
            for n in range(1, 6)
        ]
        try:
            await wait_until(entered.is_set, what="the first group's flush of new/")
            await asyncio.sleep(0.05)  # a 250 sent too early would have arrived by now
            assert not any(send.done() for send in sends)
            assert handler.delivered == 0
        finally:
            release.set()
        replies = await asyncio.gather(*sends)

    assert all(reply[1].startswith("Message accepted") for reply in replies)
    assert handler.delivered == 5
    assert len(read_maildir(maildir)) == 5
    assert list((maildir / "tmp").iterdir()) == []
    # Grouped: the four sent while the first was flushing share the next flush.
    assert handler.flushes <= 3
    if syncfs:
        assert "fsync file" not in events
        assert events.count("syncfs") == handler.flushes
    assert events[-1] == "fsync new/"


async def test_a_disk_error_answers_451_to_the_whole_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = SmtpSink(tmp_path / "mail", port=0)
    handler: MaildirHandler = sink.handler

    def failing(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(handler, "_sync_filesystem", failing)
    handler._syncfs = handler._syncfs or (lambda fd: 0)
    async with sink:
        with pytest.raises(aiosmtplib.SMTPDataError) as raised:
            await aiosmtplib.send(_message(1), hostname=sink.host, port=sink.port)
    assert raised.value.code == 451
    assert handler.delivered == 0
    assert list((tmp_path / "mail" / "new").iterdir()) == []
