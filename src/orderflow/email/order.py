"""The ``order.created`` event as the Email Service reads it, validated again.

Events may come from any producer (``XADD orders * data '{...}'`` included), so the
consumer trusts nothing: every field that reaches a header or the SMTP envelope is
checked here, and anything that could start a new header line is refused.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

#: The event type the Email Service handles; a message without ``ce_type`` is one too.
ORDER_CREATED = "order.created"
#: Bounds on what one event may carry, so a hostile producer cannot make huge emails.
MAX_ITEMS = 100
MAX_TEXT = 200
MAX_EMAIL = 254
#: Largest order id: what a signed 64-bit column holds.
MAX_ORDER_ID = 2**63 - 1
#: Largest total accepted (a sanity bound, not a business rule).
MAX_TOTAL = Decimal("1e12")
MAX_DECIMALS = 4


class InvalidOrder(ValueError):
    """An event whose payload is not a valid order; no retry can fix it."""

    def __init__(self, reason: str, *, order_id: int | None = None, email: str | None = None):
        super().__init__(reason)
        self.reason = reason
        #: What could be read of the order, for the ``email.failed`` event.
        self.order_id = order_id
        self.email = email


def _order_id(value: object) -> object:
    # bool is an int to Python; an order id of ``true`` is a producer bug, not order 1.
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit():
            raise ValueError("must be an integer")
        return int(text)
    return value


def _amount(value: object) -> Decimal:
    # JSON numbers arrive as int or float (orjson); repr() of a float is its shortest
    # round-tripping text, so 100.1 becomes Decimal("100.1"), never 100.0999999….
    if isinstance(value, bool):
        raise ValueError("must be a decimal amount, not a boolean")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value[:40]!r} is not a decimal amount") from None
    elif isinstance(value, Decimal):
        amount = value
    else:
        raise ValueError(f"must be a number or a decimal string, got {type(value).__name__}")
    if not amount.is_finite():
        raise ValueError("must be a finite amount")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMALS:
        raise ValueError(f"has more than {MAX_DECIMALS} decimals")
    if abs(amount) >= MAX_TOTAL:
        raise ValueError(f"must be below {MAX_TOTAL}")
    return amount


#: Unicode's Cc (C0 and C1 controls, CR and LF among them), Zl and Zp characters.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Whitespace (as str.isspace) or a Cc control character.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def _one_line(value: object) -> object:
    """Refuse text with control characters (CR, LF, NUL, …) or line separators."""
    if isinstance(value, str):
        bad = _CONTROL.search(value)
        if bad:
            raise ValueError(f"must be one line of text, found control character {bad[0]!r}")
        return value.strip()
    return value


OneLine = Annotated[str, BeforeValidator(_one_line), Field(min_length=1, max_length=MAX_TEXT)]
Amount = Annotated[Decimal, BeforeValidator(_amount)]


class OrderItem(BaseModel):
    """One line of an order; every field is optional but something must name it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: OneLine | None = None
    sku: OneLine | None = None
    quantity: int = Field(default=1, ge=1, le=1_000_000, strict=True)
    price: Amount | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # Producers may list plain names: ``"items": ["book", "pen"]``.
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, Mapping) and "price" not in value and "unit_price" in value:
            return {**value, "price": value["unit_price"]}
        return value

    @property
    def label(self) -> str:
        """What the email calls this item."""
        return self.name or self.sku or "item"


class Order(BaseModel):
    """A validated ``order.created`` payload: what the confirmation email is made of."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Annotated[int, BeforeValidator(_order_id), Field(ge=1, le=MAX_ORDER_ID, strict=True)]
    email: str
    total: Amount = Field(gt=0)
    currency: str = "USD"
    items: tuple[OrderItem, ...] = Field(default=(), max_length=MAX_ITEMS)
    name: OneLine | None = None
    #: The validated address in its ASCII form when it has one (IDNA domain), for the
    #: SMTP envelope; None when the local part needs SMTPUTF8.
    ascii_email: str | None = None

    @field_validator("email", mode="before")
    @classmethod
    def _valid_email(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        if len(value) > MAX_EMAIL:
            raise ValueError(f"is longer than {MAX_EMAIL} characters")
        # Whitespace and control characters have no place in an address we put in the
        # envelope and the To header; refuse them before anything else looks at it.
        if _SPACE_OR_CONTROL.search(value):
            raise ValueError("must not contain whitespace or control characters")
        try:
            return validate_address(value)[0]
        except EmailNotValidError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("currency", mode="before")
    @classmethod
    def _currency(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.isascii() or not value.isalpha():
            raise ValueError("must be a three-letter ISO 4217 code such as USD")
        if len(value) != 3:
            raise ValueError("must be a three-letter ISO 4217 code such as USD")
        return value.upper()

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be a list, got {type(value).__name__}")
        return value

    @model_validator(mode="after")
    def _ascii_form(self) -> Order:
        if self.ascii_email is None:
            object.__setattr__(self, "ascii_email", validate_address(self.email)[1])
        return self

    @property
    def envelope_recipient(self) -> str:
        """The one SMTP recipient: the ASCII form if there is one, else the UTF-8 one."""
        return self.ascii_email or self.email


#: A local part that is a plain dot-atom of common characters: always valid as it is.
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
#: RFC 5321's limit on a local part.
_MAX_LOCAL = 64


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


def parse_order(data: Mapping[str, Any]) -> Order:
    """Validate an ``order.created`` payload; InvalidOrder names every field at fault."""
    raw = {key: value for key, value in data.items() if key != "ascii_email"}
    try:
        return Order.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'order'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidOrder(
            f"invalid order: {problems}",
            order_id=_best_effort_id(raw.get("id")),
            email=_best_effort_email(raw.get("email")),
        ) from None


def _best_effort_id(value: object) -> int | None:
    try:
        parsed = _order_id(value)
    except ValueError:
        return None
    if isinstance(parsed, int) and 1 <= parsed <= MAX_ORDER_ID:
        return parsed
    return None


def _best_effort_email(value: object) -> str | None:
    # Only for the email.failed event (JSON, never a header); bounded all the same.
    return value[:MAX_EMAIL] if isinstance(value, str) else None
