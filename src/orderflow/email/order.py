"""The ``order.created`` event as the Email Service reads it, validated again.

Events may come from any producer (``XADD orders * data '{...}'`` included), so the
consumer trusts nothing: every field that reaches a header or the SMTP envelope is
checked here, and anything that could start a new header line is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from email_validator import EmailNotValidError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orderflow.domain import (
    CONTROL_CHARACTERS,
    MAX_EMAIL,
    MAX_ORDER_ID,
    is_order_id,
    validate_address,
)

#: Bounds on what one event may carry, so a hostile producer cannot make huge emails.
MAX_ITEMS = 100
MAX_TEXT = 200
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


#: Whitespace (as str.isspace) or a Cc control character.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def _one_line(value: object) -> object:
    """Refuse text with control characters (CR, LF, NUL, …) or line separators."""
    if isinstance(value, str):
        bad = CONTROL_CHARACTERS.search(value)
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


class OrderEvent(BaseModel):
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
    def _ascii_form(self) -> OrderEvent:
        if self.ascii_email is None:
            object.__setattr__(self, "ascii_email", validate_address(self.email)[1])
        return self

    @property
    def envelope_recipient(self) -> str:
        """The one SMTP recipient: the ASCII form if there is one, else the UTF-8 one."""
        return self.ascii_email or self.email


def parse_order(data: Mapping[str, Any]) -> OrderEvent:
    """Validate an ``order.created`` payload; InvalidOrder names every field at fault."""
    raw = {key: value for key, value in data.items() if key != "ascii_email"}
    try:
        return OrderEvent.model_validate(raw)
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
    if isinstance(parsed, int) and is_order_id(parsed):
        return parsed
    return None


def _best_effort_email(value: object) -> str | None:
    # Only for the email.failed event (JSON, never a header); bounded all the same.
    return value[:MAX_EMAIL] if isinstance(value, str) else None
