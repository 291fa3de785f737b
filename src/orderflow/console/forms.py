"""HTML form bodies: parsing ``application/x-www-form-urlencoded`` and the order form.

The order form is turned into the same body ``POST /orders`` takes and validated by
the same ``validate_order``, so the console cannot accept what the API would refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.requests import Request

from orderflow.orders.validation import (
    MAX_ITEMS,
    OrderRequest,
    field_errors,
    validate_idempotency_key,
    validate_order,
)

#: Largest form body read.
MAX_FORM_BYTES = 64 * 1024

_ITEM_LINE = re.compile(r"\s*(\d{1,9})\s*[x×*]?\s+(\S.*?)\s*")


class FormError(ValueError):
    """A form body that cannot be read at all."""


@dataclass(slots=True)
class Form:
    """A parsed form: every value of every field, in order."""

    values: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name``."""
        found = self.values.get(name)
        return found[0] if found else default

    def all(self, name: str) -> list[str]:
        """Every value of ``name``."""
        return list(self.values.get(name, []))


async def read_form(request: Request) -> Form:
    """Parse a urlencoded body of at most MAX_FORM_BYTES; FormError says what is wrong."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise FormError("the body must be an HTML form (application/x-www-form-urlencoded)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise FormError(f"the form is over {MAX_FORM_BYTES} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=1000)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormError(f"the form cannot be read: {exc}") from None
    form = Form()
    for name, value in pairs:
        form.values.setdefault(name, []).append(value)
    return form


@dataclass(frozen=True, slots=True)
class OrderForm:
    """What the user typed in the order form, kept to show it again after an error."""

    email: str = ""
    total: str = ""
    currency: str = "USD"
    items: str = ""
    idempotency_key: str = ""


@dataclass(slots=True)
class OrderFormResult:
    """A valid order request, or the errors by form field (``email``, ``total``, ...)."""

    form: OrderForm
    request: OrderRequest | None = None
    idempotency_key: str | None = None
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, message: str) -> None:
        """Record an error at form field ``name``."""
        self.errors.setdefault(name, []).append(message)


def parse_items(text: str) -> list[dict[str, Any]]:
    """One item per non-blank line: ``2 mug`` or ``2 x mug`` (quantity 2), or ``mug`` (1)."""
    items: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _ITEM_LINE.fullmatch(line)
        if match is not None:
            items.append({"name": match[2], "quantity": int(match[1])})
        else:
            items.append({"name": line.strip(), "quantity": 1})
    return items


def validate_order_form(form: Form) -> OrderFormResult:
    """Validate the order form exactly as ``POST /orders`` validates its body."""
    typed = OrderForm(
        email=form.get("email").strip(),
        total=form.get("total").strip(),
        currency=form.get("currency").strip() or "USD",
        items=form.get("items"),
        idempotency_key=form.get("idempotency_key").strip(),
    )
    result = OrderFormResult(typed)
    items = parse_items(typed.items)
    if len(items) > MAX_ITEMS:
        result.add("items", f"at most {MAX_ITEMS} lines")
    body: dict[str, Any] = {"email": typed.email, "total": typed.total, "currency": typed.currency}
    if items:
        body["items"] = items
    try:
        result.request = validate_order(body)
    except ValidationError as exc:
        for error in field_errors(exc):
            name, _, rest = error["field"].partition(".")
            message = error["message"]
            if name == "items" and rest:
                index, _, part = rest.partition(".")
                line = int(index) + 1 if index.isdigit() else index
                message = f"line {line}: {part + ' ' if part else ''}{message}"
            result.add(name if name in ("email", "total", "currency", "items") else "form", message)
    if typed.idempotency_key:
        try:
            result.idempotency_key = validate_idempotency_key(typed.idempotency_key)
        except ValueError as exc:
            result.add("form", f"the form's idempotency key {exc}; reload the page")
    if result.errors:
        result.request = None
    return result
