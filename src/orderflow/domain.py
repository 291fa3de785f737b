"""What the Order Service and the Email Service both hold true; neither owns it.

The two services meet only on the bus: the Order Service publishes ``order.created``,
the Email Service answers with ``email.sent`` or ``email.failed``. An order the one
accepts must not be refused by the other, so the rules both apply (an order id's
range, an address's syntax, which characters never belong in text) live here once.
"""

from __future__ import annotations

import functools
import re

from email_validator import EmailNotValidError, validate_email

#: CloudEvents ``type`` of the event the Order Service publishes for a new order.
ORDER_CREATED_EVENT = "order.created"
#: CloudEvents ``type`` of the Email Service's answers: the confirmation went out, or not.
EMAIL_SENT_EVENT = "email.sent"
EMAIL_FAILED_EVENT = "email.failed"

#: Largest order id: what a signed 64-bit column holds.
MAX_ORDER_ID = 2**63 - 1
#: Longest address accepted (RFC 5321's path limit less the angle brackets).
MAX_EMAIL = 254

#: Unicode's Cc (C0 and C1 controls, CR and LF among them), Zl and Zp characters:
#: they could split a mail header or a log line, so no field of an order has them.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: A local part that is a plain dot-atom of common characters: always valid as it is.
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
#: RFC 5321's limit on a local part.
_MAX_LOCAL = 64


def is_order_id(value: int) -> bool:
    """Whether ``value`` is in the range of order ids (1 to ``MAX_ORDER_ID``)."""
    return 1 <= value <= MAX_ORDER_ID


def validate_address(value: str) -> tuple[str, str | None]:
    """(normalised address, its ASCII form or None), exactly as email_validator gives
    them (no deliverability check, no display name, quoted local part or domain
    literal); raises EmailNotValidError.

    email_validator costs ~30 µs an address, mostly on the domain, and every order has
    another address: a plain ASCII local part is checked here by a regular expression
    and only its domain by email_validator (cached per domain). Anything else takes
    the full check, so its errors are email_validator's own.
    """
    local, at, domain = value.rpartition("@")
    if (
        at
        and len(local) <= _MAX_LOCAL
        and len(value) <= MAX_EMAIL
        and value.isascii()
        and _PLAIN_LOCAL.fullmatch(local)
    ):
        try:
            domain = _validate_domain(domain)
        except EmailNotValidError:
            pass  # the full check says why, in its own words
        else:
            address = f"{local}@{domain}"
            return address, address
    return _validate_email(value)


@functools.lru_cache(maxsize=1024)
def _validate_domain(domain: str) -> str:
    """The normalised form of an ASCII ``domain``, checked on a plain address."""
    return validate_email("a@" + domain, check_deliverability=False).domain


@functools.lru_cache(maxsize=4096)
def _validate_email(value: str) -> tuple[str, str | None]:
    """(normalised address, its ASCII form or None); cached: validation is not cheap."""
    validated = validate_email(value, check_deliverability=False)
    return validated.normalized, validated.ascii_email
