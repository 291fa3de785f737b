"""Helpers for the bus tests."""

from __future__ import annotations
