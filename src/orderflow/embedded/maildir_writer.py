"""Delivering messages into a Maildir, durably, as an MDA does: the sink's writer.

Read a Maildir with :mod:`orderflow.maildir`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)

#: The reply to a message once it is durable in ``new/``.
REPLY_ACCEPTED = "250 Message accepted for delivery"
#: The reply when the disk refused it: temporary, the client tries again later.
REPLY_LOCAL_ERROR = "451 Requested action aborted: local error in processing"


def _load_syncfs() -> Any:
    """libc's ``syncfs(fd)`` (Linux), or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError, TypeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


class MaildirHandler:
    """An aiosmtpd handler delivering each message into a Maildir, like an MDA does.

    Each message is written to ``tmp/``, flushed to disk (unless ``fsync`` is off),
    renamed into ``new/``, and the rename flushed too, before the server answers 250.
    Messages that arrive while one group is being flushed share the next flush (group
    commit): one ``syncfs`` for the group's files and one ``fsync`` of ``new/`` instead
    of a disk flush per message.

    The disk work runs on the event loop's own thread: the sink has nothing else to do
    meanwhile (what arrives waits in its socket and makes the next group), and a hop to
    a thread and back cost more than the writes, the GIL going back and forth at each
    system call (measured under load: a group's flush took 3.4 ms at p50 in a thread,
    1.6 ms of it ``syncfs``). ``flush_in_thread`` keeps the loop free instead, for a
    handler in a process that has other work.
    """

    def __init__(self, maildir: Path, *, fsync: bool = True, flush_in_thread: bool = False) -> None:
        self.maildir = Path(maildir)
        self.fsync = fsync
        self.flush_in_thread = flush_in_thread
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"
        #: Messages delivered since start.
        self.delivered = 0
        #: Disk flush rounds (groups of messages), for tests and metrics.
        self.flushes = 0
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._syncfs: Callable[[int], int] | None = _load_syncfs() if fsync else None
        self._tmp = os.path.join(self.maildir, "tmp")
        self._new = os.path.join(self.maildir, "new")
        self._names = itertools.count()

    def submit(self, message: bytes) -> asyncio.Future[None]:
        """Queue ``message`` (with its trace headers) for delivery: the future is done
        once it is durable in ``new/``, or fails with the error that kept it out."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="orderflow-maildir")
        return future

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """aiosmtpd's hook: store the message with ``Return-Path`` and ``Delivered-To``."""
        content = envelope.original_content or b""
        future = self.submit(trace_headers(envelope.mail_from or "", envelope.rcpt_tos) + content)
        try:
            # Shielded: a session that goes away must not cancel its group's flush.
            await asyncio.shield(future)
        except OSError as exc:
            # A full or unwritable disk is temporary from the client's point of view;
            # aiosmtpd would answer 500 (permanent) to an exception.
            log.error("cannot deliver into %s: %s", self.maildir, exc)
            return REPLY_LOCAL_ERROR
        return REPLY_ACCEPTED

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            errors: list[BaseException | None]
            messages = [data for data, _ in group]
            try:
                if self.flush_in_thread:
                    errors = list(await asyncio.to_thread(self._deliver_group, messages))
                else:
                    errors = list(self._deliver_group(messages))
            except Exception as exc:
                errors = [exc] * len(group)
            except BaseException:
                for _, future in group:
                    future.cancel()
                raise
            self.flushes += 1
            self.delivered += errors.count(None)
            for (_, future), error in zip(group, errors, strict=True):
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _deliver_group(self, messages: list[bytes]) -> list[OSError | None]:
        """Deliver ``messages``; each gets None once durable in ``new/``, or its error."""
        # The Maildir protocol: a unique name, written in tmp/, then renamed into new/,
        # so readers never see a partial message; the data is on disk before the
        # rename, so a crash never leaves a truncated message in new/.
        errors: list[OSError | None] = [None] * len(messages)
        written: list[tuple[int, str]] = []
        tmp, new = self._tmp, self._new
        # Unique: the time, the process and a counter of this handler (Maildir's Q<n>).
        stem = f"{time.time_ns()}.P{os.getpid()}Q"
        for i, data in enumerate(messages):
            name = f"{stem}{next(self._names)}.{self._host}"
            try:
                with open(os.path.join(tmp, name), "xb") as file:
                    file.write(data)
                    file.flush()
                    if self.fsync and self._syncfs is None:
                        os.fsync(file.fileno())
            except OSError as exc:
                errors[i] = exc
                continue
            written.append((i, name))
        if not written:
            return errors
        try:
            if self.fsync and self._syncfs is not None:
                self._sync_filesystem()
            for i, name in written:
                try:
                    os.rename(os.path.join(tmp, name), os.path.join(new, name))
                except OSError as exc:
                    errors[i] = exc
            if self.fsync:
                # The renames themselves: new/'s entries are on disk before any 250.
                fd = os.open(new, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            for i, _ in written:
                errors[i] = errors[i] or exc
        return errors

    def _sync_filesystem(self) -> None:
        # One flush of the Maildir's filesystem covers every file of the group.
        assert self._syncfs is not None
        fd = os.open(self.maildir / "tmp", os.O_RDONLY)
        try:
            if self._syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
        finally:
            os.close(fd)


def trace_headers(mail_from: str, rcpt_tos: Iterable[str]) -> bytes:
    """``Return-Path`` and one ``Delivered-To`` per recipient, as an MDA prepends them."""
    trace = f"Return-Path: <{mail_from}>\r\n"
    trace += "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in rcpt_tos)
    return trace.encode("utf-8", "surrogateescape")
