"""The Order Service's ``order.created`` events, in each version it publishes.

The payloads are built here from a stored order; the Email Service's models
(:mod:`orderflow.email.order`) are their contract, and the contract tests check that
what is built here validates against them.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from orderflow.bus import Message
from orderflow.domain import DATASCHEMA_FIELD, ORDER_CREATED_EVENT, dataschema

if TYPE_CHECKING:
    from orderflow.orders.repository import StoredOrder

#: CloudEvents source of the events this service publishes.
SOURCE = "orderflow/orders"


def event_payload(order: StoredOrder, version: int) -> dict[str, Any]:
    """The ``order.created`` payload of ``order`` in ``version`` (1 or 2)."""
    if version == 2:
        customer: dict[str, Any] = {"email": order.email}
        if order.customer_name is not None:
            customer["name"] = order.customer_name
        # Version 2's total is its priced lines' sum; a flat body's prices may leave
        # out shipping or tax, and then its lines go without them.
        priced = (
            all(item.get("price") is not None for item in order.items)
            and sum(
                (Decimal(item["price"]) * item.get("quantity", 1) for item in order.items),
                Decimal(0),
            )
            == order.total
        )
        return {
            "id": order.id,
            "customer": customer,
            "currency": order.currency,
            "lines": [_line(item, priced=priced) for item in order.items],
            "total": str(order.total),
            "created_at": order.created_at.isoformat(),
        }
    data: dict[str, Any] = {
        "id": order.id,
        "email": order.email,
        "total": str(order.total),
        "currency": order.currency,
        "items": order.items,
        "created_at": order.created_at.isoformat(),
    }
    if order.customer_name is not None:
        data["name"] = order.customer_name
    return data


def _line(item: dict[str, Any], *, priced: bool) -> dict[str, Any]:
    """A stored item as a version 2 line (``price`` is ``unit_price`` there)."""
    line: dict[str, Any] = {"name": item["name"], "quantity": item.get("quantity", 1)}
    if item.get("sku") is not None:
        line = {"sku": item["sku"], **line}
    if priced and item.get("price") is not None:
        line["unit_price"] = item["price"]
    return line


#: The ``order.created`` versions this service can publish.
ORDER_EVENT_VERSIONS = (1, 2)


def order_event(order: StoredOrder, version: int = 2) -> Message:
    """A fresh ``order.created`` event of ``order`` in ``version`` (a new event id each
    time); version 1 goes without ``ce_dataschema``, as every producer may send it."""
    if version not in ORDER_EVENT_VERSIONS:
        raise ValueError(f"order.created version {version} is not one of {ORDER_EVENT_VERSIONS}")
    headers = {DATASCHEMA_FIELD: dataschema(ORDER_CREATED_EVENT, version)} if version > 1 else None
    return Message.event(
        ORDER_CREATED_EVENT, order.event_data(version), source=SOURCE, headers=headers
    )


def lab_message(message: Message) -> Message:
    """The event as Pub/Sub mode sends it: version 1's flat JSON, what the lab's
    subscriber reads (a version 2 ``order.created`` is written back down)."""
    if message.headers.get(DATASCHEMA_FIELD) != dataschema(ORDER_CREATED_EVENT, 2):
        return message
    data = message.data
    customer = data["customer"]
    flat: dict[str, Any] = {"id": data["id"], "email": customer["email"]}
    if customer.get("name") is not None:
        flat["name"] = customer["name"]
    items = []
    for line in data.get("lines", ()):
        item = {key: line[key] for key in ("name", "sku", "quantity") if key in line}
        if line.get("unit_price") is not None:
            item["price"] = line["unit_price"]
        items.append(item)
    flat.update(
        total=data["total"], currency=data["currency"], items=items, created_at=data["created_at"]
    )
    headers = {k: v for k, v in message.headers.items() if k != DATASCHEMA_FIELD}
    return Message(data=flat, headers=headers, id=message.id)
