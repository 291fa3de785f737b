"""The SMTP handler that counts: every message and every connection, as the server saw them.

Plugged into ``SmtpServer`` (aiosmtpd) in the test's event loop. It answers 250 to
every message and records, for the accounting (``accounting.py``): each message with
its order (by ``Message-ID``), time and connection; each connection with its client
port, when it opened and closed, and whether the client said ``QUIT``.

With ``parse`` it behaves like a slow mail server: each message whose content has
arrived is queued, then parsed with the stdlib ``email`` package (a few ms each) and
delivered one at a time, in order of arrival, and only then answered ``250``. Like
a real MTA, and unlike aiosmtpd alone (which drops a session's work when its client
disconnects), it delivers every message it has received, whether or not its client
is still there to read the ``250``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections import Counter
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session

from .accounting import Connection, Mail, UnparsableMessage, order_id_of


@dataclass
class CountingHandler:
    """Accepts every message and records it, with the order it confirms (by Message-ID)."""

    mails: list[Mail] = field(default_factory=list)
    by_order: Counter[int] = field(default_factory=Counter)
    delay_s: float = 0.0
    #: A slow server: messages queued, parsed and delivered one at a time (see above).
    parse: bool = False
    #: Every connection that said anything, by number (in order of its first command).
    connections: dict[int, Connection] = field(default_factory=dict)
    _numbers: dict[SMTP, int] = field(default_factory=dict)
    _one_at_a_time: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Deliveries under way (referenced here: the event loop keeps only weak ones).
    _deliveries: set[asyncio.Task[None]] = field(default_factory=set)

    def _connection(self, server: SMTP, session: Session) -> Connection:
        number = self._numbers.get(server)
        if number is not None:
            return self.connections[number]
        number = self._numbers[server] = len(self._numbers) + 1
        peer = session.peer
        port = int(peer[1]) if isinstance(peer, tuple) else 0
        connection = self.connections[number] = Connection(number, port, time.monotonic())
        # Hooks run in the session's own task, which ends when the connection does
        # (aiosmtpd cancels it on connection loss): its end is the connection's end.
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _: _closed(connection))
        return connection

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Note the connection; answer as aiosmtpd would."""
        self._connection(server, session)
        session.host_name = hostname
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        """Note the connection; answer as aiosmtpd would."""
        self._connection(server, session)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record and answer 250."""
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        connection = self._connection(server, session)
        raw = envelope.original_content or b""
        rcpt_tos = list(envelope.rcpt_tos)
        if self.parse:
            # Its own task, shielded: a session cancelled by its client's end leaves
            # the received message in the queue, delivered all the same.
            delivery = asyncio.ensure_future(self._deliver(raw, rcpt_tos, connection))
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._deliveries.discard)
            await asyncio.shield(delivery)
        else:
            self._record(raw, rcpt_tos, connection)
        return "250 OK"

    async def _deliver(self, raw: bytes, rcpt_tos: list[str], connection: Connection) -> None:
        async with self._one_at_a_time:
            _parse(raw)
            self._record(raw, rcpt_tos, connection)

    def _record(self, raw: bytes, rcpt_tos: list[str], connection: Connection) -> None:
        try:
            order_id: int | None = order_id_of(raw)
            problem = ""
        except UnparsableMessage as exc:
            order_id, problem = None, str(exc)
        mail = Mail(order_id, rcpt_tos, raw, time.monotonic())
        mail.connection = connection.number
        mail.problem = problem
        self.mails.append(mail)
        if order_id is not None:
            self.by_order[order_id] += 1

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Note a clean end of the connection."""
        self._connection(server, session).quit = True
        return "221 Bye"

    def open_client_ports(self) -> set[int]:
        """The client ports of the connections open now."""
        return {c.client_port for c in self.connections.values() if c.closed_at is None}

    def first_copy(self, order_id: int) -> Mail:
        """The first message accepted for ``order_id``."""
        return next(m for m in self.mails if m.order_id == order_id)


def _closed(connection: Connection) -> None:
    if connection.closed_at is None:
        connection.closed_at = time.monotonic()


def _parse(raw: bytes) -> None:
    """What a server that reads its mail does: every header, every part's content."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    dict(message.items())
    for part in message.walk():
        if not part.is_multipart():
            part.get_content()
