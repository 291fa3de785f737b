"""Operator commands: ``streams info``, ``dlq``, ``group reset`` (being built)."""

from __future__ import annotations

from typing import Any


def register(commands: Any) -> None:
    """Add this module's commands (none yet)."""
