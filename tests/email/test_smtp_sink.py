"""The embedded SMTP sink: 250 only once the message is durable, flushes grouped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import smtplib
import threading
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from orderflow.embedded.maildir_writer import MaildirHandler
from orderflow.embedded.smtp_session import SinkSession
from orderflow.embedded.smtp_sink import SmtpSink
from orderflow.maildir import read_maildir
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
    # In a thread, so the test can hold the flush and look meanwhile.
    sink = SmtpSink(maildir, port=0, flush_in_thread=True)
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
            # Under test is an absence: no 250 within this time (one sent early would
            # have arrived); no event can signal that nothing happened.
            await asyncio.sleep(0.05)
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


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-per-file"])
async def test_on_the_loop_each_250_follows_its_group_s_sync_renames_and_directory_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    maildir = tmp_path / "mail"
    sink = SmtpSink(maildir, port=0)
    handler: MaildirHandler = sink.handler
    assert not handler.flush_in_thread
    if not syncfs:
        handler._syncfs = None
    elif handler._syncfs is None:
        pytest.skip("no syncfs on this platform")
    # S syncfs, F fsync of a file, R rename, D fsync of new/, A a 250 sent.
    events: list[str] = []
    real_fsync, real_rename, real_sync = os.fsync, os.rename, handler._sync_filesystem

    def fsync(fd: int) -> None:
        events.append("D" if os.path.isdir(f"/proc/self/fd/{fd}") else "F")
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append("R")
        real_rename(src, dst)

    def sync_filesystem() -> None:
        events.append("S")
        real_sync()

    real_send = SinkSession._send_replies

    def send_replies(session: SinkSession) -> None:
        events.extend("A" for reply in session._replies if reply.startswith("250 Message"))
        real_send(session)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(handler, "_sync_filesystem", sync_filesystem)
    monkeypatch.setattr(SinkSession, "_send_replies", send_replies)
    async with sink:
        await asyncio.gather(
            *(aiosmtplib.send(_message(n), hostname=sink.host, port=sink.port) for n in range(1, 9))
        )
    trace = "".join(events)
    group = r"SR+DA+" if syncfs else r"F+R+DA+"
    assert re.fullmatch(f"({group})+", trace), trace
    assert trace.count("A") == handler.delivered == 8
    assert trace.count("D") == handler.flushes
    assert len(read_maildir(maildir)) == 8


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


# -- the sink's own SMTP (SinkSession) -------------------------------------------------


class _Client:
    """A raw SMTP client: writes bytes as given, reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, sink: SmtpSink) -> _Client:
        client = cls(*await asyncio.open_connection(sink.host, sink.port))
        assert (await client.reply()).startswith("220 ")
        return client

    async def reply(self) -> str:
        """One reply, its lines joined by newlines."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            assert line.endswith("\r\n"), line
            lines.append(line[:-2])
            if line[3:4] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes, replies: int = 1) -> list[str]:
        self.writer.write(data)
        return [await self.reply() for _ in range(replies)]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SmtpSink]:
    async with SmtpSink(tmp_path / "mail", port=0, fsync=False) as running:
        yield running


async def test_sink_advertises_pipelining_and_answers_a_pipelined_batch_in_order(
    sink: SmtpSink,
) -> None:
    client = await _Client.connect(sink)
    (ehlo,) = await client.send(b"EHLO client.test\r\n")
    assert ehlo.splitlines()[1:] == [
        f"250-SIZE {10 * 1024 * 1024}",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-PIPELINING",
        "250 HELP",
    ]
    # Two whole transactions in one write: the second MAIL waits for the first 250.
    batch = b""
    for n in (1, 2):
        batch += (
            b"MAIL FROM:<orders@shop.test> SIZE=100\r\nRCPT TO:<a%d@example.com>\r\nDATA\r\n"
            b"Subject: %d\r\n\r\nbody %d\r\n.\r\n" % (n, n, n)
        )
    replies = await client.send(batch + b"QUIT\r\n", replies=9)
    assert [r[:3] for r in replies] == ["250", "250", "354", "250"] * 2 + ["221"]
    assert replies[3] == "250 Message accepted for delivery"
    assert await client.reader.read() == b""  # closed after QUIT
    await client.close()
    assert sink.delivered == 2
    bodies = sorted(m.get_content() for m in read_maildir(sink.maildir))
    assert bodies == ["body 1\r\n", "body 2\r\n"]
    (first,) = [m for m in read_maildir(sink.maildir) if m["Subject"] == "1"]
    assert first["Return-Path"] == "<orders@shop.test>"
    assert first["Delivered-To"] == "a1@example.com"


async def test_sink_undoes_dot_stuffing_and_keeps_bytes_exact(sink: SmtpSink) -> None:
    client = await _Client.connect(sink)
    await client.send(b"HELO client.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\n", 3)
    content = b"X: 1\r\n\r\n..leading dot\r\n...\r\nlast line\r\n"
    replies = await client.send(b"DATA\r\n" + content + b".\r\n", replies=2)
    assert [r[:3] for r in replies] == ["354", "250"]
    # An empty message is a message too.
    replies = await client.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n.\r\n", 4)
    assert [r[:3] for r in replies] == ["250", "250", "354", "250"]
    await client.close()
    stored = sorted(p.read_bytes() for p in (sink.maildir / "new").iterdir())
    trace = b"Return-Path: <>\r\nDelivered-To: b@example.com\r\n"
    assert stored == [trace, trace + b"X: 1\r\n\r\n.leading dot\r\n..\r\nlast line\r\n"]


async def test_sink_message_split_across_many_writes(sink: SmtpSink) -> None:
    client = await _Client.connect(sink)
    await client.send(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n", 4)
    message = b"Subject: split\r\n\r\n" + b"line\r\n" * 1000 + b".\r\n"
    for i in range(0, len(message), 7):
        client.writer.write(message[i : i + 7])
        await client.writer.drain()
    assert (await client.reply()).startswith("250 ")
    await client.close()
    (stored,) = read_maildir(sink.maildir)
    assert stored.get_content() == "line\r\n" * 1000


_MAIL = b"HELO c\r\nMAIL FROM:<a@b.test>\r\n"


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (b"MAIL FROM:<a@b.test>\r\n", ["503"]),  # no HELO
        (b"EHLO\r\n", ["501"]),
        (b"HELO c\r\nRCPT TO:<a@b.test>\r\n", ["250", "503"]),  # no MAIL
        (b"HELO c\r\nDATA\r\n", ["250", "503"]),  # no RCPT
        (b"HELO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n", ["250", "250", "503"]),
        (b"HELO c\r\nMAIL TO:<a@b.test>\r\n", ["250", "501"]),
        (b"HELO c\r\nMAIL FROM:<a@b.test\r\n", ["250", "501"]),
        (b"HELO c\r\nMAIL FROM:<a@b.test> SIZE=99999999999\r\n", ["250", "552"]),
        (b"HELO c\r\nMAIL FROM:<a@b.test> SIZE=x\r\n", ["250", "501"]),
        (b"HELO c\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\n", ["250", "501"]),
        (b"HELO c\r\nMAIL FROM:<a@b.test> AUTH=<>\r\n", ["250", "555"]),
        (b"HELO c\r\nMAIL FROM:<not an address>\r\n", ["250", "553"]),
        (b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x>\r\n", ["250", "250", "553"]),
        (
            b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test> NOTIFY=NEVER\r\n",
            ["250"] * 2 + ["555"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<x@y.test>\r\n",
            ["250"] * 3 + ["503"],
        ),
        (
            b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA now\r\n",
            ["250"] * 3 + ["501"],
        ),
        (b"NOOP\r\nVRFY x\r\nHELP\r\nBOGUS\r\n\r\n", ["250", "252", "250", "500", "500"]),
        (b"X" * 3000 + b"\r\nNOOP\r\n", ["500", "250"]),  # too long, then carries on
    ],
)
async def test_sink_refuses_what_is_out_of_order_or_malformed(
    sink: SmtpSink, commands: bytes, expected: list[str]
) -> None:
    client = await _Client.connect(sink)
    replies = await client.send(commands, replies=len(expected))
    assert [r[:3] for r in replies] == expected, replies
    await client.close()
    assert sink.delivered == 0


async def test_sink_refuses_a_message_over_the_size_limit_and_goes_on(tmp_path: Path) -> None:
    async with SmtpSink(tmp_path / "mail", port=0, fsync=False) as sink:
        session_limit = 1000
        sink._options["data_size_limit"] = session_limit
        client = await _Client.connect(sink)
        start = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
        await client.send(start, 4)
        big = b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n"
        for _ in range(100):
            client.writer.write(big)
        assert (await client.send(b".\r\n"))[0].startswith("552 ")
        replies = await client.send(start[8:] + b"Subject: small\r\n\r\nok\r\n.\r\n", 4)
        assert [r[:3] for r in replies] == ["250", "250", "354", "250"]
        await client.close()
        assert [m["Subject"] for m in read_maildir(sink.maildir)] == ["small"]


async def test_sink_answers_451_on_a_disk_error_and_keeps_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SmtpSink(tmp_path / "mail", port=0) as sink:
        handler: MaildirHandler = sink.handler
        fail = [True]
        real = handler._deliver_group

        def deliver(messages: list[bytes]) -> list[OSError | None]:
            if fail[0]:
                return [OSError(28, "No space left on device")] * len(messages)
            return real(messages)

        monkeypatch.setattr(handler, "_deliver_group", deliver)
        client = await _Client.connect(sink)
        transaction = (
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nX: 1\r\n\r\nx\r\n.\r\n"
        )
        replies = await client.send(b"EHLO c\r\n" + transaction, 5)
        assert replies[-1].startswith("451 ")
        fail[0] = False
        assert (await client.send(transaction, 4))[-1].startswith("250 ")
        await client.close()
        assert sink.delivered == 1


async def test_sink_closes_a_silent_session(sink: SmtpSink) -> None:
    client = await _Client.connect(sink)
    (session,) = sink._sessions
    session.idle_timeout_s = 0.05
    session._check_idle()  # as the timer would, once the (shortened) timeout passed
    await wait_until(lambda: session.transport is None or session.transport.is_closing())
    assert (await client.reply()).startswith("421 ")
    await client.close()


async def test_stopping_the_sink_closes_open_sessions(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "mail", port=0, fsync=False)
    await sink.start()
    client = await _Client.connect(sink)
    await sink.stop()
    assert await asyncio.wait_for(client.reader.read(), 5) == b""
    await client.close()
    assert not sink.running


async def test_the_sink_speaks_to_the_standard_library_client(sink: SmtpSink) -> None:
    # smtplib (no pipelining, its own quoting) as an independent check of the dialogue.
    def send() -> None:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.send_message(_message(7), "orders@orderflow.localhost", ["ünï@example.com"])
            assert client.noop()[0] == 250

    await asyncio.to_thread(send)
    (stored,) = read_maildir(sink.maildir)
    assert stored["Message-ID"] == "<order-7@orderflow.localhost>"
    assert stored["Delivered-To"] == "ünï@example.com"
