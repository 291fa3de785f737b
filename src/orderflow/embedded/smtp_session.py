"""The SMTP sink's own server side of SMTP (RFC 5321), with PIPELINING.

ESMTP with PIPELINING, SIZE, 8BITMIME and SMTPUTF8, one reply write per batch of
pipelined commands, rather than aiosmtpd's, which spends most of a message's CPU
parsing each address with the email package and awaiting a write per reply. Each
message goes to a :class:`~orderflow.embedded.maildir_writer.MaildirHandler`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from orderflow.embedded.maildir_writer import (
    REPLY_ACCEPTED,
    REPLY_LOCAL_ERROR,
    MaildirHandler,
    trace_headers,
)

log = logging.getLogger(__name__)

#: Largest message accepted (bytes).
DATA_SIZE_LIMIT = 10 * 1024 * 1024
#: Longest command line taken (RFC 5321 says 512; SMTPUTF8 addresses and ESMTP
#: parameters may need more).
MAX_COMMAND_LINE = 2048
#: Seconds a session may stay silent before it is closed (RFC 5321's server timeout).
IDLE_TIMEOUT_S = 300.0
_END_OF_DATA = b"\r\n.\r\n"
_HELP = "250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"


class SinkSession(asyncio.Protocol):
    """One SMTP session of the sink: RFC 5321 server side, with PIPELINING.

    Commands are parsed straight from the connection's bytes, and the replies to a
    batch of pipelined commands leave in one write. A message's 250 is sent only once
    the handler has made it durable; commands pipelined behind it wait until then, so
    replies keep their order.
    """

    def __init__(
        self,
        handler: MaildirHandler,
        sessions: set[SinkSession],
        *,
        hostname: str,
        data_size_limit: int = DATA_SIZE_LIMIT,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.idle_timeout_s = idle_timeout_s
        self.transport: asyncio.Transport | None = None
        self._sessions = sessions
        self._buffer = bytearray()
        self._replies: list[str] = []
        self._greeted = False
        self._mail_from: str | None = None
        self._rcpt_tos: list[str] = []
        self._in_data = False
        #: The message is bigger than allowed: read to its end, then refuse it.
        self._data_too_big = False
        #: A command line longer than allowed: skip to its end, then refuse it.
        self._skipping_line = False
        #: A delivery in flight: later commands wait for its reply.
        self._waiting = False
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet the client."""
        # A cast, not an isinstance check: uvloop's transports are not asyncio's classes.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._sessions.add(self)
        loop = asyncio.get_running_loop()
        self._last_active = loop.time()
        self._idle_timer = loop.call_later(self.idle_timeout_s, self._check_idle)
        transport.write(f"220 {self.hostname} ESMTP orderflow sink\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session (a delivery in flight still completes)."""
        self._sessions.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        """Take what arrived and answer every complete command in it."""
        self._buffer += data
        self._last_active = asyncio.get_running_loop().time()
        self._process()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._last_active
        if silent >= self.idle_timeout_s and not self._waiting:
            self.transport.write(b"421 Timeout, closing the connection\r\n")
            self.transport.close()
            return
        self._idle_timer = loop.call_later(max(self.idle_timeout_s - silent, 1.0), self._check_idle)

    # -- the command loop ----------------------------------------------------------------

    def _process(self) -> None:
        while not self._waiting and self.transport is not None:
            if self._in_data:
                if not self._take_message():
                    break
                continue
            line = self._take_line()
            if line is None:
                break
            self._command(line)
        self._send_replies()

    def _send_replies(self) -> None:
        if self._replies and self.transport is not None:
            self.transport.write(("\r\n".join(self._replies) + "\r\n").encode())
        self._replies.clear()

    def _take_line(self) -> str | None:
        """The next complete command line, or None until one is in."""
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    del self._buffer[:]
                    self._skipping_line = True
                return None
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if not self._skipping_line and len(raw) <= MAX_COMMAND_LINE:
                return raw.rstrip(b"\r").decode("utf-8", "surrogateescape")
            self._skipping_line = False
            self._replies.append("500 Error: line too long")

    def _take_message(self) -> bool:
        """Take the message's content once its end (a lone ``.``) is in; False before."""
        buffer = self._buffer
        if not self._data_too_big and buffer.startswith(b".\r\n"):
            content, end = b"", 3
        else:
            found = buffer.find(_END_OF_DATA)
            if found < 0:
                if len(buffer) > self.data_size_limit:
                    # Keep only what could be the start of the end marker.
                    del buffer[: len(buffer) - len(_END_OF_DATA) + 1]
                    self._data_too_big = True
                return False
            content, end = bytes(buffer[: found + 2]), found + len(_END_OF_DATA)
        del buffer[:end]
        self._in_data = False
        mail_from, rcpt_tos = self._mail_from or "", self._rcpt_tos
        self._reset()
        if self._data_too_big or len(content) > self.data_size_limit:
            self._data_too_big = False
            self._replies.append("552 Error: Too much mail data")
            return True
        # Transparency (RFC 5321 4.5.2): a line's leading dot was doubled by the client.
        if content.startswith(b".."):
            content = content[1:]
        content = content.replace(b"\r\n..", b"\r\n.")
        self._waiting = True
        future = self.handler.submit(trace_headers(mail_from, rcpt_tos) + content)
        future.add_done_callback(self._delivered)
        return True

    def _delivered(self, future: asyncio.Future[None]) -> None:
        self._waiting = False
        error = future.exception() if not future.cancelled() else None
        if future.cancelled() or error is not None:
            if error is not None:
                log.error("cannot deliver into %s: %s", self.handler.maildir, error)
            self._replies.append(REPLY_LOCAL_ERROR)
        else:
            self._replies.append(REPLY_ACCEPTED)
        self._process()

    def _reset(self) -> None:
        self._mail_from = None
        self._rcpt_tos = []

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb, arg = verb.upper(), arg.strip()
        reply = self._reply(verb, arg)
        self._replies.append(reply)
        if verb == "QUIT" and self.transport is not None:
            self._send_replies()
            self.transport.close()
            self.transport = None

    def _reply(self, verb: str, arg: str) -> str:
        if verb == "EHLO" or verb == "HELO":
            if not arg:
                return f"501 Syntax: {verb} hostname"
            self._greeted = True
            self._reset()
            if verb == "HELO":
                return f"250 {self.hostname}"
            return (
                f"250-{self.hostname}\r\n250-SIZE {self.data_size_limit}\r\n"
                "250-8BITMIME\r\n250-SMTPUTF8\r\n250-PIPELINING\r\n250 HELP"
            )
        if verb == "MAIL":
            return self._mail(arg)
        if verb == "RCPT":
            return self._rcpt(arg)
        if verb == "DATA":
            if arg:
                return "501 Syntax: DATA"
            if not self._rcpt_tos:
                return "503 Error: need RCPT command"
            self._in_data = True
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb == "RSET":
            self._reset()
            return "250 OK"
        if verb == "NOOP":
            return "250 OK"
        if verb == "QUIT":
            return "221 Bye"
        if verb == "VRFY":
            return "252 Cannot VRFY user, but will accept message and attempt delivery"
        if verb == "HELP":
            return _HELP
        if not verb:
            return "500 Error: bad syntax"
        return f'500 Error: command "{verb[:32]}" not recognized'

    def _mail(self, arg: str) -> str:
        if not self._greeted:
            return "503 Error: send HELO first"
        if self._mail_from is not None:
            return "503 Error: nested MAIL command"
        path, params = _split_path(arg, "FROM:")
        if path is None:
            return "501 Syntax: MAIL FROM: <address>"
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not value.isdigit():
                    return "501 Syntax: MAIL FROM: <address> SIZE=<n>"
                if int(value) > self.data_size_limit:
                    return "552 Error: message size exceeds fixed maximum message size"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 Error: BODY can only be one of 7BIT, 8BITMIME"
            elif key != "SMTPUTF8" or value:
                return "555 MAIL FROM parameters not recognized or not implemented"
        if path and not _plain_address(path):
            return "553 5.1.3 Error: malformed address"
        self._mail_from = path
        return "250 OK"

    def _rcpt(self, arg: str) -> str:
        if not self._greeted:
            return "503 Error: send HELO first"
        if self._mail_from is None:
            return "503 Error: need MAIL command"
        path, params = _split_path(arg, "TO:")
        if path is None:
            return "501 Syntax: RCPT TO: <address>"
        if params:
            return "555 RCPT TO parameters not recognized or not implemented"
        if not _plain_address(path):
            return "553 5.1.3 Error: malformed address"
        self._rcpt_tos.append(path)
        return "250 OK"


def _split_path(arg: str, keyword: str) -> tuple[str | None, list[str]]:
    """``FROM:<a@b> SIZE=10`` → ``("a@b", ["SIZE=10"])``; None when malformed."""
    if arg[: len(keyword)].upper() != keyword:
        return None, []
    rest = arg[len(keyword) :].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None, []
        path, params = rest[1:end], rest[end + 1 :].split()
    else:
        path, *params = rest.split() or [""]
        if not path:
            return None, []
    return path, params


def _plain_address(address: str) -> bool:
    """``local@domain`` with nothing that could break a header or a file name."""
    local, at, domain = address.rpartition("@")
    return bool(
        at
        and local
        and domain
        and address.isprintable()
        and not any(ch in address for ch in ' <>()[],;:"\\')
    )
