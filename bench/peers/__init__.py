"""The peers of bench case 3: the same order → email flow built without orderflow.

Each peer takes ``POST /orders`` (the body the case's load generator sends), stores the
order in SQLite, appends an event to a Redis stream, and consumer processes in one
consumer group send the confirmation email over SMTP to the same sink ``orderflow up``
uses. Neither has an outbox or a ledger: an order whose XADD fails after its commit gets
no email, and an email sent just before a consumer dies is sent again.

- :mod:`bench.peers.faststream_stack`: written the way FastStream's documentation
  teaches (a FastAPI route publishing with a ``RedisBroker``, a ``@broker.subscriber``
  on a stream with a consumer group, aiosmtplib).
- :mod:`bench.peers.minimal_stack`: the cheapest correct code (a raw ASGI callable,
  sqlite3, pipelined XADD, a batched XREADGROUP loop, aiosmtplib, batched XACK).
- :mod:`bench.peers.stack`: starts either one as processes, as ``orderflow up`` starts
  orderflow's.

What both share is here: the stream, the group, the envelope, the Message-ID the case
matches arrivals by, and the pool of SMTP connections their consumers send on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import aiosmtplib

#: The stream the API appends to and the consumers read.
STREAM = "peer:orders"
#: The consumer group of the email consumers.
GROUP = "emails"
#: MAIL FROM, and the From header.
MAIL_FROM = "orders@example.com"
#: Emails in flight at once per consumer process: orderflow's email worker's default.
CONCURRENCY = 32
#: Entries per XREADGROUP.
READ_COUNT = 100

#: A plain address: no spaces, quotes, angle brackets or control characters anywhere,
#: so it is safe in a header and as RCPT TO.
ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
#: Largest address (RFC 5321 path limit).
MAX_ADDRESS = 254


def message_id(order_id: int) -> str:
    """An order's Message-ID, as orderflow writes it (the case matches arrivals by it)."""
    return f"<order-{order_id}@example.com>"


def subject(order_id: int) -> str:
    """The confirmation's subject line."""
    return f"Order #{order_id} confirmed"


def body_text(order_id: int, total: str, currency: str, items: list[tuple[str, int, str]]) -> str:
    """The confirmation's plain-text body (one line per item)."""
    lines = [f"Thank you for your order #{order_id}.", ""]
    for name, quantity, price in items:
        # An item name is the customer's text: one line of it, whatever it holds.
        lines.append(f"  {quantity} x {' '.join(name.split())}  {price} {currency}")
    lines += ["", f"Total: {total} {currency}", ""]
    return "\n".join(lines)


class SmtpPool:
    """Open aiosmtplib connections to the sink, one per email in flight (a new connection
    per email, as ``aiosmtplib.send()`` makes, would be slower still). A connection an
    error broke is closed and connected again on its next use."""

    def __init__(self, host: str, port: int, size: int = CONCURRENCY) -> None:
        self.host, self.port, self.size = host, port, size
        self.idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()

    async def open(self) -> None:
        """Connect all of them."""
        for _ in range(self.size):
            smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False)
            await smtp.connect()
            self.idle.put_nowait(smtp)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosmtplib.SMTP]:
        """An idle connection, connected, for one email; back to the pool after it."""
        smtp = await self.idle.get()
        try:
            if not smtp.is_connected:
                await smtp.connect()
            yield smtp
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
            raise
        finally:
            self.idle.put_nowait(smtp)

    async def close(self) -> None:
        """Quit every idle connection."""
        while not self.idle.empty():
            smtp = self.idle.get_nowait()
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
