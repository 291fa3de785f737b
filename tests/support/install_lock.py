"""One installer at a time: test processes running side by side (pytest-xdist workers)
may both find a tool missing; the second waits for the first, then finds it there."""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def installing(what: str) -> Iterator[None]:
    """Hold the machine-wide lock for installing ``what`` (a name for the lock file)."""
    path = Path(tempfile.gettempdir()) / f"orderflow-tests-install-{what}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
