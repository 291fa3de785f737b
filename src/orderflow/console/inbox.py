"""The console's view of the embedded SMTP sink's Maildir: newest messages first.

The Maildir is read through :mod:`orderflow.maildir` (the one reader; a file seen
there is complete). A message is named by its Maildir key, which is checked against
a strict pattern before it touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path

from orderflow import maildir as md
from orderflow.maildir import valid_key

__all__ = [
    "MAX_BODY_CHARS",
    "MAX_MESSAGE_BYTES",
    "InboxListing",
    "MailSummary",
    "MailView",
    "count_inbox",
    "find_by_message_id",
    "list_inbox",
    "read_message",
    "valid_key",
]

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


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    return "" if value is None else str(value)


def _summary(message: Message, file: md.MaildirFile) -> MailSummary:
    return MailSummary(
        key=file.key,
        subject=_header(message, "Subject"),
        sender=_header(message, "From"),
        to=_header(message, "To"),
        date=_header(message, "Date"),
        message_id=_header(message, "Message-ID").strip(),
        size=file.stat.st_size,
        mtime_ns=file.stat.st_mtime_ns,
    )


def _listed(file: md.MaildirFile) -> MailSummary:
    """The summary of a listed file, from its headers only; FileNotFoundError when gone."""
    return _summary(md.read_headers(file), file)


def list_inbox(maildir: Path, *, limit: int = 100) -> InboxListing:
    """The ``limit`` newest messages (headers only) and the total count."""
    files = md.message_files(maildir)
    messages = []
    for file in files[:limit]:
        try:
            messages.append(_listed(file))
        except FileNotFoundError:
            continue
    return InboxListing(
        maildir=maildir, exists=md.exists(maildir), total=len(files), messages=messages
    )


def count_inbox(maildir: Path) -> tuple[int, str]:
    """How many messages there are and the newest key (cheap: no file is opened)."""
    files = md.message_files(maildir)
    return len(files), files[0].key if files else ""


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
    file = md.find_file(maildir, key)
    if file is None:
        return None
    raw = md.read_bytes(file, MAX_MESSAGE_BYTES)
    if raw is None:
        return None
    message = md.parse(raw)
    headers = [(name, str(value)) for name, value in message.items()]
    return MailView(
        _summary(message, file), _part(message, "plain"), _part(message, "html"), headers
    )


def find_by_message_id(maildir: Path, message_id: str, *, limit: int = 2000) -> str | None:
    """The key of the newest message with this Message-ID among the newest ``limit``."""
    wanted = message_id.strip()
    for file in md.message_files(maildir)[:limit]:
        try:
            if _listed(file).message_id == wanted:
                return file.key
        except FileNotFoundError:
            continue
    return None
