"""The packages' boundaries (docs/ARCHITECTURE.md): the bus knows nothing above it; the
Order Service stands alone beside the console and the Email Service (they meet on the
bus and in ``orderflow.domain``); only the CLI imports the development servers; no
import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_the_bus_imports_nothing_above_it() -> None:
    edges = _imports()
    assert edges["bus"], "no imports found: the scan is broken"
    assert _reachable(edges, "bus") <= {"_compat"}


def test_only_the_cli_imports_the_development_servers() -> None:
    # A worker or the API must not pull in aiosmtpd and the sink's ctypes.
    importers = sorted(unit for unit, targets in _imports().items() if "embedded" in targets)
    assert importers == ["cli"]


def test_the_services_load_without_the_development_servers() -> None:
    code = (
        "import sys\n"
        "import orderflow.app, orderflow.email, orderflow.supervisor\n"
        "print(sorted(m for m in sys.modules if m.startswith(('aiosmtpd', 'orderflow.embedded'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
