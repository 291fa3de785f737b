"""RELIABILITY.md: written from the scenarios of the session that just ran, and no other.

Each scenario fills a :class:`Record`; the session's end renders them into
``reliability_template.md`` with the commit they ran on and their size. A JSON copy of
each record is kept in ``test-artifacts/reliability/`` for CI artefacts, but the file
is never rebuilt from those: a stale record must not pass for a fresh one.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).with_name("reliability_template.md")


@dataclass
class Record:
    """What one scenario promises and what it measured."""

    scenario: str
    must_hold: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def commit_of(root: Path) -> str:
    """``git rev-parse --short HEAD`` of ``root``, with ``-dirty`` when the tree has
    changes; ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            # The report itself is the output, not a change to what ran.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!RELIABILITY.md"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if status.strip() else head


def _figures(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())


def render_reliability(records: list[dict[str, Any]], *, commit: str, mode: str) -> str:
    """RELIABILITY.md: the template with this session's scenarios in its table."""
    rows = [
        "| scenario | what must hold | result | figures | run |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for r in sorted(records, key=lambda r: str(r["test"])):
        rows.append(
            f"| {r['scenario']} | {r['must_hold']} | **{r['result']}** | "
            f"{_figures(r['figures'])} | {r['seconds']} s, {r['at']} |"
        )
        if r.get("notes"):
            notes.append(f"- **{r['scenario']}**: {r['notes']}")
    how = "`ORDERFLOW_SOAK=1`" if mode == "soak" else "the default"
    run = (
        f"Run on commit `{commit}`, {mode} size ({how}): the {len(records)} scenario(s) "
        "of one test session."
    )
    template = TEMPLATE.read_text()
    return (
        template.replace("{{run}}", run)
        .replace("{{table}}", "\n".join(rows))
        .replace("{{notes}}", "\n".join(notes) or "- (none)")
    )
