"""Fixtures of the contract tests: the official AsyncAPI parser (npm, run by Node),
installed into a cache dir when missing, as the console's tests install Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.email.conftest import smtp  # noqa: F401  (the real SMTP server fixture)
from tests.support.install_lock import installing

ROOT = Path(__file__).resolve().parents[2]
#: Where the parser is installed (npm's own cache stays npm's).
PARSER_DIR = Path(os.environ.get("ORDERFLOW_NPM_ASYNCAPI", ROOT / ".cache" / "npm-asyncapi"))
VALIDATOR = Path(__file__).with_name("validate_asyncapi.mjs")
#: The parser's severities: 0 error, 1 warning, 2 information, 3 hint.
ERROR = 0


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} and CI=true")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def asyncapi_parser() -> Path:
    """The directory holding ``node_modules/@asyncapi/parser`` (v3), installed if missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("node and npm are needed to run @asyncapi/parser")
    installed = PARSER_DIR / "node_modules" / "@asyncapi" / "parser"
    with installing("npm-asyncapi"):
        if not installed.is_dir():
            PARSER_DIR.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "@asyncapi/parser@3"],
                cwd=PARSER_DIR,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                _unavailable(f"npm install @asyncapi/parser@3 failed: {done.stderr[-500:]}")
    return PARSER_DIR


def parse_asyncapi(parser_dir: Path, document: Path) -> dict[str, Any]:
    """The parser's verdict on ``document``: ``{"parsed": bool, "diagnostics": [...]}``."""
    done = subprocess.run(
        ["node", str(VALIDATOR), str(document)],
        env={**os.environ, "ASYNCAPI_PARSER_DIR": str(parser_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    verdict: dict[str, Any] = json.loads(done.stdout)
    return verdict


def errors(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """The diagnostics of severity error."""
    return [d for d in verdict["diagnostics"] if d["severity"] == ERROR]
