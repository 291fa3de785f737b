"""A pytest plugin for mutation runs: fastest tests first, each with a deadline of its own.

mutmut runs a mutant's tests until the first failure and names them in no useful
order; a mutant that one quick test kills then waits for whichever slow tests came
first. The durations are mutmut's own, recorded when it collected its stats (in
``mutmut-stats.json``, in the directory it runs pytest from); without them the order
is left as it is.

A mutant that hangs a test (a loop that never ends, an event never set) is a kill only
once pytest-timeout stops the test. One ``--timeout`` for every test makes a hang of a
0.05 s test cost as much as a hang of the slowest test: with
``--mutation-timeout-factor F`` each test with a recorded duration ``d`` gets its own
timeout, ``floor + F * d`` seconds (``--mutation-timeout-floor``, which also covers its
fixtures' set-up and tear-down, not in ``d``), never more than ``--timeout``.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    """The per-test deadline's settings (off unless a factor is given)."""
    group = parser.getgroup("mutation")
    group.addoption(
        "--mutation-timeout-factor",
        type=float,
        default=0.0,
        help="each test's timeout: floor + this times its recorded duration (0: off)",
    )
    group.addoption(
        "--mutation-timeout-floor",
        type=float,
        default=5.0,
        help="seconds added to every per-test timeout (set-up and tear-down included)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Leave what exists already out of the garbage collector's passes (``gc.freeze``).

    mutmut forks each mutant's session from its main process, which holds everything its
    stats run built; pytest collects garbage at the end of every session, and going
    through all of that took 0.2 s of a 0.6 s session. Frozen, only what the session
    itself makes is scanned.
    """
    gc.freeze()
    _steady_hypothesis()


def _steady_hypothesis() -> None:
    """Property tests that judge a mutant by what it does, not by the machine's load.

    Hypothesis fails an example slower than 200 ms (its deadline) and a test whose data
    is slow to generate (a health check): on this shared machine that "killed" mutants
    no test can tell from the original (message ``decode_entry`` 1 and 58, which passed
    40 runs out of 40 alone). No deadline, no health checks, and the same examples in
    every session (``derandomize``, no example database): a mutant is judged on the
    examples the clean run passed.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile(
        "mutation",
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    settings.load_profile("mutation")


def per_test_timeout(duration: float, factor: float, floor: float, cap: float) -> float:
    """``floor + factor * duration`` seconds, at most ``cap`` (when ``cap`` is set)."""
    timeout = floor + factor * duration
    return min(timeout, cap) if cap > 0 else timeout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Sort the collected tests by their recorded duration, shortest first; set deadlines."""
    try:
        durations: dict[str, float] = json.loads(STATS.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    # Unknown tests (new since the stats) last: nothing says they are quick.
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
    factor = float(config.getoption("--mutation-timeout-factor"))
    if factor <= 0:
        return
    floor = float(config.getoption("--mutation-timeout-floor"))
    cap = float(config.getoption("--timeout", default=0.0) or 0.0)
    for item in items:
        duration = durations.get(item.nodeid)
        if duration is not None:
            # First in the list: it is the closest marker, before any the test has.
            item.add_marker(
                pytest.mark.timeout(per_test_timeout(duration, factor, floor, cap)),
                append=False,
            )
