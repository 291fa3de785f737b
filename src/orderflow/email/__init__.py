"""The Email Service: renders and sends each order's confirmation email, once.

Pieces: ``order`` (the event as validated at the consumer), ``render`` (Jinja2
templates to a multipart email), ``sender`` (the sender port and its SMTP adapter),
``ledger`` (the per-order Redis ledger that makes sending idempotent) and ``service``
(the consumer-group worker tying them together).
"""

from orderflow.email.ledger import Claim, ClaimState, EmailLedger, ledger_key
from orderflow.email.order import InvalidOrder, OrderEvent, OrderItem, parse_order
from orderflow.email.render import OutgoingEmail, Renderer, message_id_for
from orderflow.email.sender import (
    PermanentSendError,
    Sender,
    SendError,
    SmtpConfig,
    SmtpSender,
    SmtpUnreachable,
    TransientSendError,
)
from orderflow.email.service import EmailService, OrderBusy

__all__ = [
    "Claim",
    "ClaimState",
    "EmailLedger",
    "EmailService",
    "InvalidOrder",
    "OrderBusy",
    "OrderEvent",
    "OrderItem",
    "OutgoingEmail",
    "PermanentSendError",
    "Renderer",
    "SendError",
    "Sender",
    "SmtpConfig",
    "SmtpSender",
    "SmtpUnreachable",
    "TransientSendError",
    "ledger_key",
    "message_id_for",
    "parse_order",
]
