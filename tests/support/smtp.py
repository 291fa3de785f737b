"""An SMTP handler that accepts every message and counts them by order."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session

# The Email Service's Message-ID: <order-{id}@host> (see orderflow.email.mime).
_MESSAGE_ID = re.compile(rb"^Message-ID: <order-(\d+)@", re.M | re.I)


def order_id_of(raw: bytes) -> int | None:
    """The order a message confirms, from its Message-ID; None when it has none."""
    headers = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n")
    match = _MESSAGE_ID.search(headers)
    return int(match.group(1)) if match else None


@dataclass
class CountingHandler:
    """Accepts every message (after ``delay_s``), recording it and the order it confirms."""

    mails: list[bytes] = field(default_factory=list)
    by_order: Counter[int] = field(default_factory=Counter)
    delay_s: float = 0.0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record and answer 250."""
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a slow server, as the test asks
        raw = envelope.original_content or b""
        self.mails.append(raw)
        order_id = order_id_of(raw)
        if order_id is not None:
            self.by_order[order_id] += 1
        return "250 OK"
