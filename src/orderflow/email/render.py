"""Rendering an order's confirmation: a multipart/alternative text and HTML email.

Bodies come from Jinja2 templates (HTML autoescaped); the message is written by
:mod:`orderflow.email.mime`, which refuses any header value that could start a header
of its own. The envelope has exactly one recipient, the validated address.
"""

from __future__ import annotations

import email
import email.policy
import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

import jinja2

from orderflow.config import ConfigError
from orderflow.email.mime import build_alternative, format_address
from orderflow.email.order import OrderEvent, OrderLine


class MailFromError(ConfigError):
    """``mail_from`` is not a single, valid address."""


def parse_mail_from(mail_from: str) -> Address:
    """The one address in ``mail_from`` (e.g. ``orderflow <orders@example.com>``)."""
    if any(ch in mail_from for ch in "\r\n"):
        raise MailFromError("ORDERFLOW_MAIL_FROM must be one line")
    header = email.policy.SMTP.header_factory("From", mail_from)
    addresses: tuple[Address, ...] = tuple(getattr(header, "addresses", ()))
    if header.defects or len(addresses) != 1 or not addresses[0].domain:
        raise MailFromError(
            f"ORDERFLOW_MAIL_FROM {mail_from!r} must be one address like "
            "'orderflow <orders@example.com>'"
        )
    return addresses[0]


def message_id_for(order_id: int, domain: str) -> str:
    """The deterministic Message-ID of an order's confirmation."""
    return f"<order-{order_id}@{domain}>"


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """A rendered email and its envelope: what a Sender delivers."""

    #: MAIL FROM.
    sender: str
    #: The one RCPT TO: the validated address.
    recipient: str
    message_id: str
    #: The RFC 5322 message, CRLF line ends.
    data: bytes

    @property
    def smtputf8(self) -> bool:
        """True when an address needs the server's SMTPUTF8 extension."""
        return not (self.sender.isascii() and self.recipient.isascii())

    def parsed(self) -> EmailMessage:
        """The message parsed by the standard library (for tests and tools)."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# and the views are made per email, read by the templates and dropped.
@dataclass(slots=True)
class _LineView:
    """What the templates read of an order line: its text, converted once."""

    name: str
    sku: str | None
    quantity: int
    unit_price: str | None
    line_total: str | None


@dataclass(slots=True)
class _OrderView:
    """What the templates read of an order (``order.*``), computed once for both
    templates: plain attributes, amounts as their text, so neither template pays for a
    property, a Decimal's conversion or a model's attribute lookup per use."""

    id: int
    name: str | None
    currency: str
    total: str
    priced: bool
    lines: tuple[_LineView, ...]


def _line_view(line: OrderLine) -> _LineView:
    price = line.unit_price
    if price is None:
        return _LineView(line.name, line.sku, line.quantity, None, None)
    return _LineView(line.name, line.sku, line.quantity, str(price), str(price * line.quantity))


def _order_view(order: OrderEvent) -> _OrderView:
    lines = tuple(_line_view(line) for line in order.lines)
    priced = bool(lines) and all(line.unit_price is not None for line in lines)
    return _OrderView(order.id, order.name, order.currency, str(order.total), priced, lines)


def _without_globals(environment: jinja2.Environment) -> jinja2.Environment:
    # The templates use none of Jinja's default globals (range, lipsum, cycler ...), and
    # every render copies them into its context: a third of a small template's time.
    environment.globals.clear()
    return environment


def _date_header(when: datetime) -> str:
    """RFC 5322 date of ``when``, to the second (one formatting per second)."""
    return _format_second(when.replace(microsecond=0))


@functools.lru_cache(maxsize=4)
def _format_second(when: datetime) -> str:
    return format_datetime(when)


class Renderer:
    """Turns an order into its confirmation email; templates are compiled once."""

    def __init__(self, mail_from: str) -> None:
        sender = parse_mail_from(mail_from)
        #: The envelope sender (MAIL FROM).
        self.envelope_sender = sender.addr_spec
        # Message-IDs must be ASCII: an internationalised domain goes in as IDNA.
        self.domain = sender.domain.encode("idna").decode("ascii")
        self._from = format_address(sender.display_name or None, sender.addr_spec)
        #: The Date header of the current second, and that second.
        self._second, self._second_text = -1, ""
        loader = jinja2.PackageLoader("orderflow.email", "templates")
        self._html = _without_globals(
            jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
        ).get_template("confirmation.html.j2")
        # Plain text is not markup: escaping it would show &amp; to the reader.
        self._text = _without_globals(
            jinja2.Environment(
                loader=loader,
                autoescape=False,  # noqa: S701
                undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True,
            )
        ).get_template("confirmation.txt.j2")

    def _date(self, now: datetime | None) -> str:
        """The Date header of an email rendered ``now`` (the clock when None); the
        clock's is formatted once per second."""
        if now is not None:
            return _date_header(now)
        second = int(time.time())
        if second != self._second:
            self._second_text = _date_header(datetime.fromtimestamp(second, UTC))
            self._second = second
        return self._second_text

    def message_id(self, order_id: int) -> str:
        """The Message-ID this renderer gives order ``order_id``."""
        return message_id_for(order_id, self.domain)

    def subject(self, order: OrderEvent) -> str:
        """The subject line: the order id only, so nothing of the event reaches it."""
        return f"Order #{order.id} confirmed"

    def render(self, order: OrderEvent, *, now: datetime | None = None) -> OutgoingEmail:
        """The confirmation email of ``order``."""
        message_id = self.message_id(order.id)
        headers = [
            ("From", self._from),
            ("To", format_address(order.name, order.envelope_recipient)),
            ("Subject", self.subject(order)),
            ("Date", self._date(now)),
            ("Message-ID", message_id),
            ("X-Orderflow-Order-Id", str(order.id)),
        ]
        view = _order_view(order)
        data = build_alternative(
            headers, self._text.render(order=view), self._html.render(order=view)
        )
        return OutgoingEmail(
            sender=self.envelope_sender,
            recipient=order.envelope_recipient,
            message_id=message_id,
            data=data,
        )
