"""The packages' boundaries: the Order Service stands alone beside the console and the
Email Service (they meet on the bus and in ``orderflow.domain``), with no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import orderflow.orders

SRC = Path(orderflow.orders.__file__).parents[1]


def _imports() -> dict[str, set[str]]:
    """Which of orderflow's top-level packages or modules each one imports (statically,
    TYPE_CHECKING imports and those inside functions included)."""
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        unit = path.relative_to(SRC).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orderflow"):
                parts = (node.module or "").split(".")
                targets = parts[1:2] or [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [
                    alias.name.split(".")[1]
                    for alias in node.names
                    if alias.name.startswith("orderflow.")
                ]
            else:
                continue
            edges.setdefault(unit, set()).update(t for t in targets if t != unit)
    return edges


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in edges.get(todo.pop(), set()) - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_order_service_imports_neither_the_console_nor_the_email_service() -> None:
    edges = _imports()
    assert edges["orders"], "no imports found: the scan is broken"
    assert {"console", "email", "app"}.isdisjoint(_reachable(edges, "orders"))
    assert "orders" not in _reachable(edges, "email")


def test_no_import_cycle_between_packages() -> None:
    edges = _imports()
    cycles = sorted(unit for unit in edges if unit in _reachable(edges, unit))
    assert cycles == []
