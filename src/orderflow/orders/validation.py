"""What a valid order is: parsing and validating ``POST /orders`` bodies exactly.

The body is parsed with decimals for numbers (never a float), duplicate keys and
NaN refused, then validated by a strict pydantic model; every error names its field.
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import orjson
from email_validator import EmailNotValidError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from orderflow.domain import CONTROL_CHARACTERS, MAX_EMAIL, MAX_ORDER_ID, validate_address

#: Largest accepted request body.
MAX_BODY_BYTES = 64 * 1024
MAX_ITEMS = 100
MAX_ITEM_NAME = 200
MAX_QUANTITY = 10_000
#: NUMERIC(12, 2): ten digits before the point.
MAX_AMOUNT = Decimal("9999999999.99")
MAX_IDEMPOTENCY_KEY = 255

_ISO_4217 = """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL
    BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF
    DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF
    IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR
    LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO
    NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK
    SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH
    UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG
    XDR XOF XPD XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG ZWL
"""
#: Active ISO 4217 currency codes (a static list: they change a few times a decade).
CURRENCIES = frozenset(_ISO_4217.split())

_AMOUNT_TEXT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")


class BodyError(ValueError):
    """A body that is not a JSON object at all (its field is ``body``)."""


def _amount(value: Any, *, allow_zero: bool) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        raise ValueError('must be a decimal number or a string such as "100.00"')
    if isinstance(value, str) and not _AMOUNT_TEXT.fullmatch(value):
        raise ValueError('must be a decimal string like "100.00" (at most 2 decimals)')
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise ValueError("must be greater than 0" if not allow_zero else "must not be negative")
    if amount > MAX_AMOUNT:
        raise ValueError(f"must be at most {MAX_AMOUNT}")
    cents = amount.quantize(Decimal("0.01"))
    if cents != amount:
        raise ValueError("must have at most 2 decimals")
    return cents


def _total(value: Any) -> Decimal:
    return _amount(value, allow_zero=False)


def _price(value: Any) -> Decimal:
    return _amount(value, allow_zero=True)


def _no_control(value: str) -> str:
    # The set the Email Service refuses too, so an order taken here is never
    # dead-lettered there.
    if CONTROL_CHARACTERS.search(value):
        raise ValueError("must not contain control characters such as CR or LF")
    return value


Total = Annotated[Decimal, BeforeValidator(_total)]
Price = Annotated[Decimal, BeforeValidator(_price)]


def _text(value: str) -> str:
    # The Email Service strips names; a blank one would leave nothing to show.
    if not value.strip():
        raise ValueError("must not be blank")
    return _no_control(value)


#: A name or SKU: one line of printable text, what the Email Service accepts.
Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ITEM_NAME), AfterValidator(_text)]


class Item(BaseModel):
    """One line of an order."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Text
    sku: Text | None = None
    quantity: StrictInt = Field(default=1, ge=1, le=MAX_QUANTITY)
    price: Price | None = None

    def wire(self) -> dict[str, Any]:
        """The item as stored and published in version 1 (the price as a string)."""
        out: dict[str, Any] = {"name": self.name, "quantity": self.quantity}
        if self.sku is not None:
            out["sku"] = self.sku
        if self.price is not None:
            out["price"] = str(self.price)
        return out


class OrderRequest(BaseModel):
    """A validated ``POST /orders`` body (today's flat shape; a version 2 body arrives
    as one of these too, its customer's name kept aside)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    email: StrictStr = Field(min_length=3, max_length=MAX_EMAIL)
    total: Total
    currency: StrictStr = "USD"
    items: list[Item] = Field(default_factory=list, max_length=MAX_ITEMS)
    id: StrictInt | None = Field(default=None, ge=1, le=MAX_ORDER_ID)
    _customer_name: str | None = PrivateAttr(default=None)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return _address(value)

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return _currency_code(value)

    @property
    def customer_name(self) -> str | None:
        """The customer's name (a version 2 body's ``customer.name``), if given."""
        return self._customer_name

    def fingerprint(self) -> str:
        """sha256 of the normalised request: equal for the same order however it is spelled."""
        canonical: dict[str, Any] = {
            "email": self.email,
            "total": str(self.total),
            "currency": self.currency,
            "items": [item.wire() for item in self.items],
            "id": self.id,
        }
        if self._customer_name is not None:
            # Only when given, so the fingerprints of orders stored before stay the same.
            canonical["name"] = self._customer_name
        return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _address(value: str) -> str:
    _no_control(value)
    try:
        # The check the Email Service makes too (so an order taken here is never
        # refused there): no display names, no quoted local parts, no domain literals,
        # nothing that could smuggle another address or a header into the email.
        return validate_address(value)[0]
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address: {exc}") from None


def _currency_code(value: str) -> str:
    code = value.upper()
    if code not in CURRENCIES:
        raise ValueError("must be a known ISO 4217 currency code such as USD or EUR")
    return code


class Customer(BaseModel):
    """A version 2 body's customer."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    email: Annotated[StrictStr, Field(min_length=3, max_length=MAX_EMAIL), AfterValidator(_address)]
    name: Text | None = None


class Line(BaseModel):
    """A version 2 body's line: its unit price is required."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sku: Text | None = None
    name: Text
    quantity: StrictInt = Field(default=1, ge=1, le=MAX_QUANTITY)
    unit_price: Price


class OrderRequestV2(BaseModel):
    """A ``POST /orders`` body in the shape of ``order.created`` version 2."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    customer: Customer
    total: Total
    currency: Annotated[StrictStr, AfterValidator(_currency_code)] = "USD"
    lines: list[Line] = Field(default_factory=list, max_length=MAX_ITEMS)
    id: StrictInt | None = Field(default=None, ge=1, le=MAX_ORDER_ID)

    def request(self) -> OrderRequest:
        """The same order as the service keeps it."""
        request = OrderRequest.model_construct(
            email=self.customer.email,
            total=self.total,
            currency=self.currency,
            items=[
                Item.model_construct(
                    name=line.name, sku=line.sku, quantity=line.quantity, price=line.unit_price
                )
                for line in self.lines
            ],
            id=self.id,
        )
        request._customer_name = self.customer.name
        return request


def _no_constant(name: str) -> Any:
    raise BodyError(f"{name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_body(raw: bytes) -> dict[str, Any]:
    """Parse a JSON object body with numbers as decimals; BodyError says what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise BodyError(f"is over {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("is not UTF-8") from None
    try:
        value = json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_no_constant,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise BodyError(f"is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except (RecursionError, InvalidOperation):
        raise BodyError("is not a JSON document we can read") from None
    if not isinstance(value, dict):
        raise BodyError(f"must be a JSON object, got {type(value).__name__}")
    return value


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as ``[{"field": "items.0.name", "message": ...}]``."""
    errors = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "is not a known field"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        errors.append({"field": field, "message": message})
    return errors


def validate_order(data: dict[str, Any]) -> OrderRequest:
    """Validate a parsed body, today's shape or version 2's (``customer``, ``lines``);
    raises pydantic's ValidationError, also for a total that disagrees with its lines."""
    if "customer" not in data and "lines" not in data:
        # Today's body, as ever: its items' prices may leave out shipping or tax.
        return OrderRequest.model_validate(data)
    request = OrderRequestV2.model_validate(data).request()
    expected = sum((item.price * item.quantity for item in request.items if item.price), ZERO)
    if request.items and expected != request.total:
        # Every consumer of version 2 checks this: refused here, never dead-lettered there.
        raise _mismatch(request.total, expected)
    return request


ZERO = Decimal(0)


def _mismatch(total: Decimal, expected: Decimal) -> ValidationError:
    detail = f"lines add up to {expected} (quantity x unit_price), the total says {total}"
    return ValidationError.from_exception_data(
        "OrderRequest",
        [
            InitErrorDetails(
                type=PydanticCustomError("total_mismatch", "{detail}", {"detail": detail}),
                loc=(field,),
                input=str(total) if field == "total" else expected,
            )
            for field in ("total", "lines")
        ],
    )


def validate_idempotency_key(value: str) -> str:
    """A printable key of at most 255 characters, or ValueError."""
    if not value or len(value) > MAX_IDEMPOTENCY_KEY:
        raise ValueError(f"must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    if not value.isprintable() or not value.isascii():
        raise ValueError("must be printable ASCII")
    return value
