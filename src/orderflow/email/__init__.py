"""The Email Service: renders and sends each order's confirmation email, once.

Pieces: ``order`` (the event as validated at the consumer, every version it reads),
``events`` (its own ``email.sent`` / ``email.failed``), ``render`` (Jinja2
templates to a multipart email), ``sender`` (the sender port and its SMTP adapter),
``ledger`` (the per-order Redis ledger that makes sending idempotent) and ``service``
(the consumer-group worker tying them together).
"""

from orderflow.email.events import EmailFailed, EmailSent
from orderflow.email.ledger import Claim, ClaimState, EmailLedger, ledger_key
from orderflow.email.order import (
    ORDER_CREATED_VERSIONS,
    InvalidOrder,
    OrderCreatedV1,
    OrderCreatedV2,
    OrderEvent,
    OrderItem,
    parse_order,
    upcast_v1,
)
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
    "ORDER_CREATED_VERSIONS",
    "Claim",
    "ClaimState",
    "EmailFailed",
    "EmailLedger",
    "EmailSent",
    "EmailService",
    "InvalidOrder",
    "OrderBusy",
    "OrderCreatedV1",
    "OrderCreatedV2",
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
    "upcast_v1",
]
