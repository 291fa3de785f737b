"""The development servers (``orderflow.embedded``) stay out of production code.

Of orderflow's own modules only the CLI, which starts them, imports them: a worker or
the API must not pull in aiosmtpd and the sink's ctypes to read one file name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import orderflow

PACKAGE = Path(next(iter(orderflow.__path__)))
DEV_SERVERS = "orderflow.embedded"
#: Packages allowed to import the development servers: the CLI and the servers themselves.
ALLOWED = ("cli", "embedded")


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_only_the_cli_imports_the_development_servers() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ALLOWED:
            continue
        for name in _imported(ast.parse(path.read_text(), str(path))):
            if name == DEV_SERVERS or name.startswith(DEV_SERVERS + "."):
                offenders.append(f"{relative}: {name}")
    assert offenders == []


def test_the_services_load_without_aiosmtpd() -> None:
    code = (
        "import sys\n"
        "import orderflow.email, orderflow.orders.api, orderflow.supervisor\n"
        "import orderflow.console.inbox\n"
        "print(sorted(m for m in sys.modules if m.startswith(('aiosmtpd', 'orderflow.embedded'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
