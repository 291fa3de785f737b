"""RELIABILITY.md's rendering: this session's records only, with the commit and size."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from .reliability import commit_of, render_reliability


def _record(test: str, result: str = "pass") -> dict[str, Any]:
    return {
        "test": test,
        "scenario": f"scenario {test}",
        "must_hold": "holds",
        "result": result,
        "figures": {"orders": 3, "duplicates": 0},
        "notes": "",
        "mode": "quick",
        "seconds": 1.5,
        "at": "2026-01-01T00:00:00+00:00",
    }


def test_the_report_names_the_commit_the_size_and_only_the_records_given() -> None:
    text = render_reliability([_record("b"), _record("a", "FAIL")], commit="abc1234", mode="quick")
    assert "Run on commit `abc1234`, quick size (the default): the 2 scenario(s)" in text
    rows = [line for line in text.splitlines() if line.startswith("| scenario ")][1:]
    run = "1.5 s, 2026-01-01T00:00:00+00:00"
    assert rows == [
        f"| scenario a | holds | **FAIL** | orders 3, duplicates 0 | {run} |",
        f"| scenario b | holds | **pass** | orders 3, duplicates 0 | {run} |",
    ]
    assert "{{" not in text
    soak = render_reliability([_record("a")], commit="abc1234-dirty", mode="soak")
    assert "`abc1234-dirty`, soak size (`ORDERFLOW_SOAK=1`)" in soak


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_the_commit_is_dirty_when_a_tracked_file_changed_but_not_for_the_report(
    tmp_path: Path,
) -> None:
    _git(tmp_path, "init", "-q")
    for name in ("code.py", "RELIABILITY.md"):
        (tmp_path / name).write_text("x\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert commit_of(tmp_path) == head
    (tmp_path / "RELIABILITY.md").write_text("rewritten by the last run\n")
    (tmp_path / "untracked.txt").write_text("y\n")
    assert commit_of(tmp_path) == head
    (tmp_path / "code.py").write_text("changed\n")
    assert commit_of(tmp_path) == f"{head}-dirty"
    assert commit_of(tmp_path / "nowhere") == "unknown"
