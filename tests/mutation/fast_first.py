"""A pytest plugin for mutation runs: likely killers first, each test with a deadline.

mutmut runs a mutant's tests until the first failure and names them in no useful
order; a mutant that one quick test kills then waits for whichever slow tests came
first. So the tests that have already killed a mutant of the same function in this
run come first (``mutmut-kills.jsonl``: each session appends the test that failed and
the function of its mutant), quickest first, then the rest, fastest first. The
durations are mutmut's own, recorded when it collected its stats (in
``mutmut-stats.json``, in the directory it runs pytest from); without them the order
is left as it is. The order changes only how soon a mutant is killed, never whether.

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
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

STATS = Path("mutmut-stats.json")
KILLS = Path("mutmut-kills.jsonl")


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


#: Each session's own temporary directory, under the directory mutmut runs pytest from.
TMP = Path("mutmut-tmp")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Leave what exists already out of the garbage collector's passes (``gc.freeze``);
    give the session a temporary directory of its own.

    mutmut forks each mutant's session from its main process, which holds everything its
    stats run built; pytest collects garbage at the end of every session, and going
    through all of that took 0.2 s of a 0.6 s session. Frozen, only what the session
    itself makes is scanned.

    pytest's default temporary directories are numbered ones under one directory per
    user, each session removing the oldest: with several sessions at once (and any other
    pytest run on the machine) one removes what another is listing, and with warnings as
    errors that fails a session no mutant touched (seen: mutmut's forced-fail session
    died of an unclosed ``os.scandir`` in that clean-up). A ``--basetemp`` of its own,
    set before pytest's tmp_path plugin reads it (``tryfirst``), has no clean-up to race.
    """
    gc.freeze()
    _steady_hypothesis()
    if config.option.basetemp is None:
        TMP.mkdir(exist_ok=True)  # pytest makes the session's own, not its parents
        config.option.basetemp = str((TMP / str(os.getpid())).absolute())


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's own temporary directory (a session stopped at its deadline
    leaves it: the runner removes the module's ``mutmut-tmp`` when mutmut is done)."""
    if config.option.basetemp and Path(config.option.basetemp).parent == TMP.absolute():
        shutil.rmtree(config.option.basetemp, ignore_errors=True)


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


def mutated_function(mutant: str) -> str:
    """The function a mutant belongs to: ``pkg.mod.xǁClsǁf__mutmut_3`` -> ``pkg.mod.xǁClsǁf``."""
    return mutant.rsplit("__mutmut_", 1)[0] if "__mutmut_" in mutant else ""


def read_kills(path: Path, function: str) -> Counter[str]:
    """How many mutants of ``function`` each test has killed so far in this run."""
    kills: Counter[str] = Counter()
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return kills
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a session stopped at its deadline
        if isinstance(record, dict) and record.get("function") == function:
            kills[str(record.get("test"))] += 1
    return kills


def record_kill(path: Path, function: str, test: str) -> None:
    """Append one kill; one short ``O_APPEND`` write, so sessions at once do not mix."""
    line = json.dumps({"function": function, "test": test}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_order(tests: list[str], durations: dict[str, float], kills: Counter[str]) -> list[str]:
    """Tests that killed this function's mutants before (most kills per second of their
    time first), then the rest fastest first; tests without a recorded time last."""

    def key(test: str) -> tuple[int, float]:
        duration = durations.get(test, float("inf"))
        if kills[test]:
            return (0, duration / kills[test])
        return (1, duration)

    return sorted(tests, key=key)


def _mutant() -> str:
    return os.environ.get("MUTANT_UNDER_TEST", "")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test that failed in a mutant's session killed it: remember which, for the next."""
    function = mutated_function(_mutant())
    if report.failed and function:
        record_kill(KILLS, function, report.nodeid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the collected tests (likely killers, then shortest first); set deadlines."""
    try:
        durations: dict[str, float] = json.loads(STATS.read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    order = run_order(
        [item.nodeid for item in items], durations, read_kills(KILLS, mutated_function(_mutant()))
    )
    rank = {nodeid: i for i, nodeid in enumerate(order)}
    items.sort(key=lambda item: rank[item.nodeid])
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
