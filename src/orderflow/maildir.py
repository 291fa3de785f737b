"""Reading a Maildir: its messages newest first, found by key, parsed with the email API.

The one reader of the Maildir the SMTP sink delivers into, for the console's inbox,
the demo and the tests. Messages are read from ``new/`` and ``cur/`` only: writers
(the sink, any MDA) write in ``tmp/`` and rename, so a file seen here is complete.
A message's key is its file name up to the ``:`` that starts Maildir's info suffix.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from pathlib import Path

#: A Maildir key as the sink (and common MDAs) write them; nothing that walks a path.
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+,-]{0,254}")
_FOLDERS = ("new", "cur")


@dataclass(frozen=True, slots=True)
class MaildirFile:
    """One message's file: its key, path and ``stat`` (size, modification time)."""

    key: str
    path: Path
    stat: os.stat_result


def valid_key(key: str) -> bool:
    """True when ``key`` looks like a Maildir key (and so cannot name another path)."""
    return KEY_PATTERN.fullmatch(key) is not None


def exists(maildir: Path) -> bool:
    """True when ``maildir`` is a Maildir (has ``new/``), even an empty one."""
    return (Path(maildir) / "new").is_dir()


def message_files(maildir: Path) -> list[MaildirFile]:
    """Every message's file, newest first (none when there is no Maildir)."""
    found = []
    for sub in _FOLDERS:
        try:
            entries = list(os.scandir(Path(maildir) / sub))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # moved or removed by a reader meanwhile
                continue
            found.append(MaildirFile(entry.name.split(":", 1)[0], Path(entry.path), stat))
    # Newest first; the key breaks ties the same way every time.
    found.sort(key=lambda file: (file.stat.st_mtime_ns, file.key), reverse=True)
    return found


def find_file(maildir: Path, key: str) -> MaildirFile | None:
    """The file of the message with key ``key``, or None (also for a key that is not one)."""
    if not valid_key(key):
        return None
    for sub in _FOLDERS:
        folder = Path(maildir) / sub
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name == key or name.startswith(key + ":"):
                path = folder / name
                try:
                    return MaildirFile(key, path, path.stat())
                except FileNotFoundError:
                    return None
    return None


def read_bytes(file: MaildirFile, limit: int | None = None) -> bytes | None:
    """The message's bytes (at most ``limit``), or None when it is gone meanwhile."""
    try:
        with open(file.path, "rb") as handle:
            return handle.read() if limit is None else handle.read(limit)
    except FileNotFoundError:
        return None


def read_headers(file: MaildirFile) -> Message:
    """Only the message's headers (its body is not parsed); FileNotFoundError when gone."""
    with open(file.path, "rb") as handle:
        return BytesHeaderParser(policy=email.policy.default).parse(handle)


def parse(raw: bytes) -> EmailMessage:
    """A message's bytes parsed with the modern email API (``email.policy.default``)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def iter_maildir(maildir: Path) -> Iterator[EmailMessage]:
    """Every message in the Maildir (new and cur), newest first, parsed."""
    for file in message_files(maildir):
        raw = read_bytes(file)
        if raw is not None:
            yield parse(raw)


def read_maildir(maildir: Path, message_id: str | None = None) -> list[EmailMessage]:
    """The messages, newest first, or only those with Message-ID ``message_id``."""
    return [
        m
        for m in iter_maildir(maildir)
        if message_id is None or (m.get("Message-ID") or "").strip() == message_id
    ]


def count_delivered(maildir: Path, message_id: str | None = None) -> int:
    """How many messages (with that Message-ID, if given) the Maildir holds."""
    return len(read_maildir(maildir, message_id))
