"""aiosmtplib internals: RFC 2920 PIPELINING, by taking the connection's replies over.

aiosmtplib (3.0 to 5.1.3 at least) sends one command and waits for its reply, four round
trips per email. The fast path writes MAIL, RCPT and DATA at once and reads their
replies itself, by swapping the transport's protocol for the transaction
(``transport.set_protocol``) and handing it back to aiosmtplib's ``SMTPProtocol``
afterwards: that relies on how aiosmtplib's protocol holds its state between commands.
Fallback: aiosmtplib's public ``mail()``, ``rcpt()`` and ``data()``, one round trip each.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.protocol import SMTPProtocol

from orderflow._compat import decide

#: The aiosmtplib versions the fast path was tested on: the sender's tests pass with
#: 3.0.0, 3.0.2, 4.0.2, 5.0.0 and 5.1.3.
TESTED = ((3, 0), (5, 2))
PIPELINING = decide("aiosmtplib.pipelining", "aiosmtplib", TESTED)

#: Longest reply line taken (aiosmtplib's limit).
_MAX_REPLY_LINE = 8192
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


async def pipelined_transaction(
    client: aiosmtplib.SMTP,
    sender: str,
    recipient: str,
    data: bytes,
    *,
    options: list[str],
    encoding: str,
    timeout_s: float,
) -> None:
    """MAIL, RCPT and DATA in one write, then the content (RFC 2920 PIPELINING): two
    round trips and two writes per email instead of four of each.

    aiosmtplib reads one reply per command it wrote (and drops replies that arrive
    early), so for the transaction the connection's replies go to :class:`_Replies`;
    the connection goes back to aiosmtplib's protocol afterwards. Errors are the ones
    aiosmtplib's mail(), rcpt() and data() raise, in the same order.
    """
    smtp = client.protocol
    transport = cast(asyncio.WriteTransport | None, smtp.transport if smtp is not None else None)
    if smtp is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    for address in (sender, recipient):
        if _CONTROL.search(address):
            raise ValueError("Command arg contains a prohibited control character")
    params = "".join(" " + option for option in options)
    commands = f"MAIL FROM:<{sender}>{params}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n"
    content = wire_content(data)
    replies = _Replies(smtp)
    transport.set_protocol(replies)
    try:
        transport.write(commands.encode(encoding))
        mail = await replies.next(timeout_s)
        rcpt = await replies.next(timeout_s)
        start = await replies.next(timeout_s)
        if mail.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
        if rcpt.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
            raise aiosmtplib.SMTPRecipientRefused(rcpt.code, rcpt.message, recipient)
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        transport.write(content)
        done = await replies.next(timeout_s)
        if done.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(done.code, done.message)
    finally:
        if not transport.is_closing():
            transport.set_protocol(smtp)


def wire_content(data: bytes) -> bytes:
    """A message as DATA sends it: CRLF line ends, a leading dot doubled (RFC 5321
    4.5.2), then the ending ``.`` line.

    The regular expressions run only when needed: a rendered email has CRLF line ends
    and no line starting with a dot, and running them over it anyway cost ~5% of a
    worker's CPU per email. Counting (in C) tells.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_END.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"


class _Replies(asyncio.Protocol):
    """Collects an SMTP server's replies while a pipelined transaction has the
    connection; its connection events still reach aiosmtplib's protocol."""

    def __init__(self, smtp: SMTPProtocol) -> None:
        self._smtp = smtp
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next(self, timeout_s: float) -> SMTPResponse:
        """The next reply, waiting at most ``timeout_s`` for it."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from exc
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply (a reply's lines but its last have ``-``)."""
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > _MAX_REPLY_LINE or not line[:3].isdigit():
                self._error = aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, f"Malformed SMTP response line: {line[:80]!r}"
                )
                break
            self._lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
                self._replies.append(
                    SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape"))
                )
                self._lines.clear()
        self._wake()

    def eof_received(self) -> bool:
        """The server closed its side: no more replies will come."""
        self._error = self._error or aiosmtplib.SMTPServerDisconnected("Unexpected EOF received")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the transaction, and tell aiosmtplib's protocol the connection is gone."""
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._error = self._error or error
        self._wake()
        self._smtp.connection_lost(exc)

    def pause_writing(self) -> None:
        """Flow control stays with aiosmtplib's protocol."""
        self._smtp.pause_writing()

    def resume_writing(self) -> None:
        """Flow control stays with aiosmtplib's protocol."""
        self._smtp.resume_writing()
