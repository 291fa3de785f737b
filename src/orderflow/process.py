"""Helpers for the child processes orderflow starts (workers, redis-server)."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """In a child before exec: ask Linux to SIGTERM it when its parent dies (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
