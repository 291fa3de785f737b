"""Each event version's schema, as generated from the code, against the one recorded
in ``contracts/``: a change that would break a consumer (or producer) of an existing
version fails here, naming what broke; a new optional field passes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from orderflow.contracts import MESSAGES, MessageSpec
from orderflow.contracts.compat import breaking_changes
from orderflow.contracts.recorded import contract_path, payload_schema, read_contract
from orderflow.email.order import OrderCreatedV1

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
RECORD = "orderflow asyncapi --write-contracts contracts/"


@pytest.mark.parametrize("spec", MESSAGES, ids=lambda spec: f"{spec.event_type}-v{spec.version}")
def test_generated_schema_keeps_the_recorded_promise(spec: MessageSpec) -> None:
    recorded = read_contract(CONTRACTS, spec)
    assert recorded is not None, f"{contract_path(CONTRACTS, spec)} is missing: run `{RECORD}`"

    broken = breaking_changes(recorded, payload_schema(spec))

    assert broken == [], (
        f"{spec.event_type} v{spec.version} would break its consumers: {'; '.join(broken)}. "
        "Make the change a new version (a new model and ce_dataschema) instead."
    )


def test_every_recorded_version_is_still_in_the_code() -> None:
    known = {contract_path(CONTRACTS, spec) for spec in MESSAGES}
    recorded = set(CONTRACTS.glob("*/v*.json"))
    assert recorded - known == set(), "a recorded version was dropped from the code"


def _v1() -> dict[str, Any]:
    return OrderCreatedV1.model_json_schema()


def _changed(schema: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(schema)
    *parents, last = path.split(".")
    target = changed
    for part in parents:
        target = target[part]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return changed


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: _changed(s, "properties.email", None), "email: field removed"),
        (
            lambda s: _changed(s, "properties.id", {"type": "string"}),
            "id: retyped from integer to string",
        ),
        (
            lambda s: {**s, "required": [*s["required"], "currency"]},
            "currency: new required field",
        ),
        (
            lambda s: _changed(s, "properties.currency", {"type": "string", "enum": ["USD"]}),
            "currency: enum narrowed",
        ),
        (
            lambda s: _changed(s, "$defs.OrderItem.properties.quantity.maximum", 10),
            "items[].quantity: maximum narrowed from 1000000 to 10",
        ),
        (
            lambda s: _changed(s, "$defs.OrderItem.properties.name", {"type": "integer"}),
            "items[].name: retyped from null|string to integer",
        ),
    ],
)
def test_breaking_changes_are_named(change: Any, expected: str) -> None:
    broken = breaking_changes(_v1(), change(_v1()))
    assert any(problem.startswith(expected) for problem in broken), broken


def test_a_narrowed_enum_names_the_lost_value() -> None:
    old = {"type": "object", "properties": {"s": {"type": "string", "enum": ["a", "b"]}}}
    new = {"type": "object", "properties": {"s": {"type": "string", "enum": ["a"]}}}
    assert breaking_changes(old, new) == ["s: enum narrowed: ['b'] no longer allowed"]
    assert breaking_changes(new, old) == []  # widened: fine


def test_a_new_optional_field_is_compatible() -> None:
    class Wider(OrderCreatedV1):
        gift_note: str | None = Field(default=None, max_length=200)

    assert breaking_changes(_v1(), Wider.model_json_schema()) == []


def test_a_model_change_in_the_code_is_caught() -> None:
    # As a developer would: a field of order.created v1 renamed in the model.
    class Renamed(BaseModel):
        id: int
        address: str
        total: str

    broken = breaking_changes(_v1(), Renamed.model_json_schema())
    assert "email: field removed" in broken
    assert "address: new required field" in broken
