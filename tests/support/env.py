"""An environment free of the developer's own ``ORDERFLOW_*`` settings."""

from __future__ import annotations

import os

import pytest

PREFIX = "ORDERFLOW_"
#: Kept: the server binary the test run chose (tests/conftest.py, ORDERFLOW_TEST_SERVER),
#: so a child's embedded Redis is the server under test.
KEPT = ("ORDERFLOW_REDIS_SERVER",)


def clean_env(**extra: str) -> dict[str, str]:
    """A copy of ``os.environ`` without any ``ORDERFLOW_*`` variable (but the test run's
    server binary), plus ``extra``: the environment of a child process that must see
    only what the test sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX) or k in KEPT}
    env.update(extra)
    return env


def clear_orderflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every ``ORDERFLOW_*`` variable from this process for one test."""
    for name in list(os.environ):
        if name.startswith(PREFIX) and name not in KEPT:
            monkeypatch.delenv(name)
