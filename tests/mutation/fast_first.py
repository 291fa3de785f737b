"""A pytest plugin for mutation runs: the targeted tests run fastest first.

mutmut runs a mutant's tests until the first failure and names them in no useful
order; a mutant that one quick test kills then waits for whichever slow tests came
first. The durations are mutmut's own, recorded when it collected its stats (in
``mutmut-stats.json``, in the directory it runs pytest from); without them the order
is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Sort the collected tests by their recorded duration, shortest first."""
    try:
        durations: dict[str, float] = json.loads(STATS.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    # Unknown tests (new since the stats) last: nothing says they are quick.
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
