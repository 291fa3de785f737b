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

#: The stream field naming a payload's version (absent: version 1).
DATASCHEMA_FIELD = "ce_dataschema"
#: What ``ce_dataschema`` holds: ``urn:orderflow:schema:<type>:<N>``.
_DATASCHEMA = re.compile(r"urn:orderflow:schema:([a-z][a-z0-9._-]{0,63}):([1-9][0-9]{0,5})")

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


class UnsupportedVersion(ValueError):
    """A ``ce_dataschema`` that names no version this code reads."""


def dataschema(event_type: str, version: int) -> str:
    """The ``ce_dataschema`` value of ``event_type`` version ``version``."""
    return f"urn:orderflow:schema:{event_type}:{version}"


def schema_version(value: str | None, event_type: str) -> int:
    """The payload version a ``ce_dataschema`` value names: 1 when absent.

    Raises UnsupportedVersion for a malformed value or one of another event type
    (what it says cannot be trusted to describe this payload).
    """
    if value is None:
        return 1
    found = _DATASCHEMA.fullmatch(value)
    if found is None or found[1] != event_type:
        raise UnsupportedVersion(
            f"unsupported schema version: ce_dataschema {value[:100]!r} is not "
            f"urn:orderflow:schema:{event_type}:<N>"
        )
    return int(found[2])


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
