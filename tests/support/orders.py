"""Order bodies as a client sends them to ``POST /orders``."""

from __future__ import annotations

from typing import Any


def order_body(n: int = 1, **overrides: Any) -> dict[str, Any]:
    """A valid order body for buyer ``n`` (fields in ``overrides`` replace or add)."""
    body: dict[str, Any] = {"email": f"buyer{n}@example.com", "total": "100.00"}
    body.update(overrides)
    return body
