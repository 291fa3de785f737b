"""The ``order.created`` event as the Email Service reads it, validated again, in
every version it knows (the payload models are the contract: the AsyncAPI document's
schemas are generated from them).

Events may come from any producer (``XADD orders * data '{...}'`` included), so the
consumer trusts nothing: every field that reaches a header or the SMTP envelope is
checked here, and anything that could start a new header line is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from email_validator import EmailNotValidError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
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


#: An amount every check of _amount passes: at most 12 integer digits (below
#: MAX_TOTAL) and MAX_DECIMALS decimals. Matched first, it spares the checks (a
#: third of an order's validation: three amounts per order).
_PLAIN_AMOUNT = re.compile(r"-?[0-9]{1,12}(?:\.[0-9]{1,4})?")


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
        text = value.strip()
        if _PLAIN_AMOUNT.fullmatch(text):
            # The usual shape ("49.90"): finite, within bounds, at most 4 decimals.
            return Decimal(text)
        try:
            amount = Decimal(text)
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


class _Payload(BaseModel):
    """What every ``order.created`` version shares: an id, an amount, a currency."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: Annotated[int, BeforeValidator(_order_id), Field(ge=1, le=MAX_ORDER_ID, strict=True)]

    @field_validator("currency", mode="before", check_fields=False)
    @classmethod
    def _currency(cls, value: Any) -> str:
        if not isinstance(value, str) or not value.isascii() or not value.isalpha():
            raise ValueError("must be a three-letter ISO 4217 code such as USD")
        if len(value) != 3:
            raise ValueError("must be a three-letter ISO 4217 code such as USD")
        return value.upper()


def _address(value: Any) -> str:
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


def _list(value: Any) -> Any:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list, got {type(value).__name__}")
    return value


def _time_text(value: Any) -> Any:
    # Version 1 never checked created_at; a producer's odd value is dropped, not refused.
    return value if isinstance(value, str) and len(value) <= MAX_TEXT else None


Address = Annotated[
    str, BeforeValidator(_address), WithJsonSchema({"type": "string", "format": "email"})
]
#: v2's amounts: decimal strings on the wire (numbers are read too, never written).
DecimalText = Annotated[
    Decimal,
    BeforeValidator(_amount),
    WithJsonSchema({"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,4})?$"}),
]
Timestamp = Annotated[
    str | None,
    BeforeValidator(_time_text),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class OrderCreatedV1(_Payload):
    """``order.created`` version 1 (no ``ce_dataschema``): the lab's flat order."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="OrderCreatedV1",
        json_schema_extra={
            "examples": [{"id": 101, "email": "alice@example.com", "total": "100.00"}]
        },
    )

    email: Address
    total: Amount = Field(gt=0)
    currency: str = "USD"
    items: Annotated[tuple[OrderItem, ...], BeforeValidator(_list)] = Field(
        default=(), max_length=MAX_ITEMS
    )
    name: OneLine | None = None
    created_at: Timestamp = None


class Customer(BaseModel):
    """Who ordered: the address the confirmation goes to, and a name when known."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    email: Address
    name: OneLine | None = None


class OrderLine(BaseModel):
    """One line of a version 2 order; ``unit_price`` when the producer knows it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    sku: OneLine | None = None
    name: OneLine
    quantity: int = Field(default=1, ge=1, le=1_000_000, strict=True)
    unit_price: DecimalText | None = None

    @property
    def line_total(self) -> Decimal | None:
        """quantity x unit price, when the price is known."""
        return None if self.unit_price is None else self.unit_price * self.quantity


class OrderCreatedV2(_Payload):
    """``order.created`` version 2 (``urn:orderflow:schema:order.created:2``)."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        title="OrderCreatedV2",
        json_schema_extra={
            "examples": [
                {
                    "id": 101,
                    "customer": {"email": "alice@example.com", "name": "Alice"},
                    "currency": "USD",
                    "lines": [
                        {"sku": "BK-1", "name": "Book", "quantity": 1, "unit_price": "100.00"}
                    ],
                    "total": "100.00",
                    "created_at": "2026-12-02T10:00:00+00:00",
                }
            ]
        },
    )

    customer: Customer
    currency: str
    lines: Annotated[tuple[OrderLine, ...], BeforeValidator(_list)] = Field(
        default=(), max_length=MAX_ITEMS
    )
    total: DecimalText = Field(gt=0)
    created_at: Timestamp = None

    @model_validator(mode="after")
    def _total_of_lines(self) -> OrderCreatedV2:
        priced = [total for line in self.lines if (total := line.line_total) is not None]
        if priced and len(priced) == len(self.lines):
            expected = sum(priced, Decimal(0))
            if expected != self.total:
                raise ValueError(
                    f"total {self.total} is not the sum of the lines' "
                    f"quantity x unit_price ({expected})"
                )
        return self


def upcast_v1(order: OrderCreatedV1) -> OrderCreatedV2:
    """The one place a version 1 order becomes a version 2 one (already validated:
    built as is, so a v1 total that disagrees with its items, never checked, stays)."""
    return OrderCreatedV2.model_construct(
        id=order.id,
        customer=Customer.model_construct(email=order.email, name=order.name),
        currency=order.currency,
        lines=tuple(
            OrderLine.model_construct(
                sku=item.sku, name=item.label, quantity=item.quantity, unit_price=item.price
            )
            for item in order.items
        ),
        total=order.total,
        created_at=order.created_at,
    )


#: The payload model of each ``order.created`` version the Email Service reads.
ORDER_CREATED_VERSIONS: dict[int, type[OrderCreatedV1] | type[OrderCreatedV2]] = {
    1: OrderCreatedV1,
    2: OrderCreatedV2,
}


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """A validated ``order.created`` of any version, as version 2: what the
    confirmation email is made of."""

    order: OrderCreatedV2
    #: The version it arrived in.
    version: int = 2
    #: The validated address in its ASCII form when it has one (IDNA domain), for the
    #: SMTP envelope; None when the local part needs SMTPUTF8.
    ascii_email: str | None = None

    @property
    def id(self) -> int:
        """The order id."""
        return self.order.id

    @property
    def email(self) -> str:
        """The customer's (normalised) address."""
        return self.order.customer.email

    @property
    def name(self) -> str | None:
        """The customer's name, when the event has one."""
        return self.order.customer.name

    @property
    def total(self) -> Decimal:
        """The order's total."""
        return self.order.total

    @property
    def currency(self) -> str:
        """ISO 4217 code of the amounts."""
        return self.order.currency

    @property
    def lines(self) -> tuple[OrderLine, ...]:
        """The order's lines (a v1 order's items, upcast)."""
        return self.order.lines

    @property
    def items(self) -> tuple[OrderItem, ...]:
        """The lines in version 1's terms (name, sku, quantity, price)."""
        return tuple(
            OrderItem.model_construct(
                name=line.name, sku=line.sku, quantity=line.quantity, price=line.unit_price
            )
            for line in self.order.lines
        )

    @property
    def priced(self) -> bool:
        """Whether every line has a unit price: the email is then a receipt."""
        return bool(self.lines) and all(line.unit_price is not None for line in self.lines)

    @property
    def envelope_recipient(self) -> str:
        """The one SMTP recipient: the ASCII form if there is one, else the UTF-8 one."""
        return self.ascii_email or self.email


def parse_order(data: Mapping[str, Any], version: int = 1) -> OrderEvent:
    """Validate an ``order.created`` payload of ``version`` (a known one); InvalidOrder
    names every field at fault."""
    model = ORDER_CREATED_VERSIONS[version]
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'order'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        customer = data.get("customer")
        email = customer.get("email") if isinstance(customer, Mapping) else data.get("email")
        raise InvalidOrder(
            f"invalid order: {problems}",
            order_id=_best_effort_id(data.get("id")),
            email=_best_effort_email(email),
        ) from None
    order = parsed if isinstance(parsed, OrderCreatedV2) else upcast_v1(parsed)
    return OrderEvent(order, version, validate_address(order.customer.email)[1])


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
