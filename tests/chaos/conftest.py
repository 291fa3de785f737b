"""Fixtures of the chaos scenarios, and the session's RELIABILITY.md.

The harness is split by job: ``processes.py`` and ``faultproxy.py`` inject faults,
``mailcounter.py`` is the SMTP server's counting handler, ``accounting.py`` decides
(pure functions, tested by ``test_accounting.py``), ``load.py`` submits orders and
``stack.py`` runs a scenario's system. Every scenario runs the real processes, then
settles and accounts: every order accepted with 201 has an email, none without, and a
duplicate only where a fault the scenario injected explains it.

Each scenario fills its ``reliability`` record; when scenarios ran, the session's end
rewrites ``RELIABILITY.md`` from them (and only them). Sizes: small by default
(``make test``), large with ``ORDERFLOW_SOAK=1`` (``make soak``).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from .mailcounter import CountingHandler
from .processes import ORDERFLOW
from .reliability import Record, commit_of, render_reliability
from .stack import Stack, wait_until, write_duplicate_report
from .stack import make_stack as _make_stack

__all__ = [
    "ORDERFLOW",
    "SCENARIO_TIMEOUT",
    "SOAK",
    "CountingHandler",
    "Record",
    "Stack",
    "chaos_rng",
    "duplicates_file",
    "make_stack",
    "size",
    "wait_until",
    "write_duplicate_report",
]

SOAK = os.environ.get("ORDERFLOW_SOAK", "") == "1"
RESULTS_DIR = Path("test-artifacts") / "reliability"

#: The per-test timeout of a scenario: the soak sizes need far more than the default.
SCENARIO_TIMEOUT = pytest.mark.timeout(1200 if SOAK else 150)


def size(quick: int, soak: int) -> int:
    """A scenario size: ``quick`` in ``make test``, ``soak`` in ``make soak``."""
    return soak if SOAK else quick


def chaos_rng(seed: int = 7) -> random.Random:
    """A seeded random source, so a failing run can be replayed."""
    return random.Random(int(os.environ.get("ORDERFLOW_CHAOS_SEED", seed)))


def duplicates_file(name: str) -> Path:
    """Where a scenario writes its per-duplicate details."""
    return Path("test-artifacts") / "duplicates" / f"{name}-{'soak' if SOAK else 'quick'}.json"


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Build a scenario's Stack (Redis with AOF ``always`` unless ``persistent=False``)."""
    stacks: list[Stack] = []

    async def make(*, persistent: bool = True) -> Stack:
        tmp = tmp_path / f"stack{len(stacks)}"
        tmp.mkdir()
        stack = await _make_stack(tmp, persistent=persistent)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.close()


# -- RELIABILITY.md --------------------------------------------------------------------

_RECORDS = pytest.StashKey[list[dict[str, Any]]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so the fixture knows the outcome."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Record]:
    """The scenario's record, kept for this session's RELIABILITY.md."""
    record = Record(scenario="", must_hold="")
    started = time.monotonic()
    yield record
    report = getattr(request.node, "report_call", None)
    passed = report is not None and report.passed
    data = {
        "test": request.node.nodeid,
        "scenario": record.scenario or request.node.name,
        "must_hold": record.must_hold,
        "result": "pass" if passed else "FAIL",
        "figures": record.figures,
        "notes": record.notes,
        "mode": "soak" if SOAK else "quick",
        "seconds": round(time.monotonic() - started, 1),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    request.config.stash.setdefault(_RECORDS, []).append(data)
    # A copy for CI artefacts; RELIABILITY.md is never rebuilt from these files.
    out = Path(str(request.config.rootpath)) / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    name = request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    (out / f"{data['mode']}-{name}.json").write_text(json.dumps(data, indent=2))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Rewrite RELIABILITY.md from the scenarios of this session, when any ran."""
    records = session.config.stash.get(_RECORDS, [])
    if not records:
        return
    root = Path(str(session.config.rootpath))
    text = render_reliability(records, commit=commit_of(root), mode="soak" if SOAK else "quick")
    (root / "RELIABILITY.md").write_text(text)
