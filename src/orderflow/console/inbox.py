"""The console's view of the embedded SMTP sink's Maildir: newest messages first.

Messages are read straight from ``new/`` and ``cur/`` (the sink writes through
``tmp/`` and renames, so a file seen here is complete). A message is named by its
Maildir key, which is checked against a strict pattern before it touches the disk.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path

#: A Maildir key as the sink (and common MDAs) write them; nothing that walks a path.
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+,-]{0,254}")
#: Largest message body shown (characters); longer ones are cut with a note.
MAX_BODY_CHARS = 512 * 1024
#: Largest message file read (bytes).
MAX_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MailSummary:
    """One message in the inbox list."""

    key: str
    subject: str
    sender: str
    to: str
    date: str
    message_id: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class MailView:
    """One message opened: its summary, the text and HTML parts (either may be None)."""

    summary: MailSummary
    text: str | None
    html: str | None
    headers: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class InboxListing:
    """The newest messages, how many there are, and whether the Maildir exists."""

    maildir: Path
    exists: bool
    total: int
    messages: list[MailSummary]

    @property
    def version(self) -> str:
        """Changes whenever a message arrives or leaves (for live notices)."""
        newest = self.messages[0].key if self.messages else ""
        return f"{self.total}:{newest}"


def _files(maildir: Path) -> list[tuple[str, Path, os.stat_result]]:
    found = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            key = entry.name.split(":", 1)[0]
            try:
                stat = entry.stat()
            except FileNotFoundError:  # moved by a reader meanwhile
                continue
            found.append((key, Path(entry.path), stat))
    # Newest first; the key breaks ties the same way every time.
    found.sort(key=lambda item: (item[2].st_mtime_ns, item[0]), reverse=True)
    return found


def _header(message: email.message.Message, name: str) -> str:
    value = message.get(name)
    return "" if value is None else str(value)


def _summary(key: str, path: Path, stat: os.stat_result) -> MailSummary:
    with open(path, "rb") as file:
        headers = BytesHeaderParser(policy=email.policy.default).parse(file)
    return MailSummary(
        key=key,
        subject=_header(headers, "Subject"),
        sender=_header(headers, "From"),
        to=_header(headers, "To"),
        date=_header(headers, "Date"),
        message_id=_header(headers, "Message-ID").strip(),
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )


def list_inbox(maildir: Path, *, limit: int = 100) -> InboxListing:
    """The ``limit`` newest messages (headers only) and the total count."""
    files = _files(maildir)
    messages = []
    for key, path, stat in files[:limit]:
        try:
            messages.append(_summary(key, path, stat))
        except FileNotFoundError:
            continue
    exists = (maildir / "new").is_dir()
    return InboxListing(maildir=maildir, exists=exists, total=len(files), messages=messages)


def count_inbox(maildir: Path) -> tuple[int, str]:
    """How many messages there are and the newest key (cheap: no file is opened)."""
    files = _files(maildir)
    return len(files), files[0][0] if files else ""


def valid_key(key: str) -> bool:
    """True when ``key`` looks like a Maildir key (and so cannot name another path)."""
    return KEY_PATTERN.fullmatch(key) is not None


def _find(maildir: Path, key: str) -> tuple[Path, os.stat_result] | None:
    if not valid_key(key):
        return None
    for sub in ("new", "cur"):
        folder = maildir / sub
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name == key or name.startswith(key + ":"):
                path = folder / name
                try:
                    return path, path.stat()
                except FileNotFoundError:
                    return None
    return None


def _cut(text: str) -> str:
    if len(text) <= MAX_BODY_CHARS:
        return text
    return text[:MAX_BODY_CHARS] + "\n… (cut: the message is longer than the console shows)"


def _part(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_subtype() != subtype:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown charset or a broken encoding
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else ""
    return _cut(content) if isinstance(content, str) else None


def read_message(maildir: Path, key: str) -> MailView | None:
    """The message with Maildir key ``key``, or None when there is none."""
    found = _find(maildir, key)
    if found is None:
        return None
    path, stat = found
    if stat.st_size > MAX_MESSAGE_BYTES:
        raw = path.read_bytes()[:MAX_MESSAGE_BYTES]
    else:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    summary = MailSummary(
        key=key,
        subject=_header(message, "Subject"),
        sender=_header(message, "From"),
        to=_header(message, "To"),
        date=_header(message, "Date"),
        message_id=_header(message, "Message-ID").strip(),
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )
    headers = [(name, str(value)) for name, value in message.items()]
    return MailView(summary, _part(message, "plain"), _part(message, "html"), headers)


def find_by_message_id(maildir: Path, message_id: str, *, limit: int = 2000) -> str | None:
    """The key of the newest message with this Message-ID among the newest ``limit``."""
    wanted = message_id.strip()
    for key, path, stat in _files(maildir)[:limit]:
        try:
            if _summary(key, path, stat).message_id == wanted:
                return key
        except FileNotFoundError:
            continue
    return None
