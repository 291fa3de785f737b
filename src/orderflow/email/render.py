"""Rendering an order's confirmation: a multipart/alternative text and HTML email.

The message is built with ``email.message.EmailMessage`` under the SMTP policy: every
header is set from a validated, single-line value through the header registry, so no
field of an event can start a header of its own or add a recipient.
"""

from __future__ import annotations

import email.policy
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

import jinja2

from orderflow.config import ConfigError
from orderflow.email.order import Order


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


class Renderer:
    """Turns an order into its confirmation email; templates are compiled once."""

    def __init__(self, mail_from: str) -> None:
        self.sender = parse_mail_from(mail_from)
        #: The envelope sender (MAIL FROM).
        self.envelope_sender = self.sender.addr_spec
        # Message-IDs must be ASCII: an internationalised domain goes in as IDNA.
        self.domain = self.sender.domain.encode("idna").decode("ascii")
        loader = jinja2.PackageLoader("orderflow.email", "templates")
        self._html = jinja2.Environment(
            loader=loader, autoescape=True, undefined=jinja2.StrictUndefined
        ).get_template("confirmation.html.j2")
        # Plain text is not markup: escaping it would show &amp; to the reader.
        self._text = jinja2.Environment(
            loader=loader,
            autoescape=False,  # noqa: S701
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
        ).get_template("confirmation.txt.j2")

    def message_id(self, order_id: int) -> str:
        """The Message-ID this renderer gives order ``order_id``."""
        return message_id_for(order_id, self.domain)

    def subject(self, order: Order) -> str:
        """The subject line: the order id only, so nothing of the event reaches it."""
        return f"Order #{order.id} confirmed"

    def render(self, order: Order, *, now: datetime | None = None) -> EmailMessage:
        """The confirmation email of ``order``."""
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = self.sender
        # username/domain rather than addr_spec: the parser refuses a UTF-8 local part,
        # which SMTPUTF8 allows; the address was fully validated already.
        local, _, domain = order.envelope_recipient.rpartition("@")
        msg["To"] = Address(display_name=order.name or "", username=local, domain=domain)
        msg["Subject"] = self.subject(order)
        msg["Date"] = format_datetime(now or datetime.now(UTC))
        msg["Message-ID"] = self.message_id(order.id)
        msg["X-Orderflow-Order-Id"] = str(order.id)
        msg.set_content(self._text.render(order=order))
        msg.add_alternative(self._html.render(order=order), subtype="html")
        return msg
