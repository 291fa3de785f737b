"""The README's "Runs on" table, pyproject.toml's bounds and the lock files agree.

Each direct runtime dependency's row reads ``<lower bound> .. <locked version>``: the bound
from pyproject.toml (which requirements/lowest.txt pins, so .ci/lowest tests it) and the
version in requirements/run.txt (what ``make run`` installs).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
ROW = re.compile(r"^\|([^|]*)\|([^|]*)\|\s*$")


def _project() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


def _requirements(group: str | None = None) -> list[Requirement]:
    """The direct dependencies: the runtime ones, or an extra's."""
    project = _project()
    specs = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [Requirement(spec) for spec in specs]


def _lower_bound(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{req}: a direct dependency needs exactly one >= bound"
    return bounds[0]


def _pins(lock: str) -> dict[str, set[str]]:
    """Every pinned version in a lock file, by canonical name (a marker may fork one)."""
    pins: dict[str, set[str]] = {}
    for line in (LOCKS / lock).read_text().splitlines():
        if m := PIN.match(line):
            pins.setdefault(canonicalize_name(m[1]), set()).add(m[2])
    return pins


def _one(pins: dict[str, set[str]], name: str, lock: str) -> Version:
    versions = pins.get(canonicalize_name(name))
    assert versions, f"{name} is not pinned in requirements/{lock}: run `make lock`"
    assert len(versions) == 1, f"{name} has several versions in requirements/{lock}"
    return Version(next(iter(versions)))


def _runs_on_rows() -> dict[str, tuple[str, str]]:
    """The "Runs on" section's table rows: first cell -> (cell as written, second cell)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Runs on\n", 1)
    assert len(section) == 2, 'README.md has no "## Runs on" section'
    body = section[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in body.splitlines():
        if (m := ROW.match(line.strip())) and not set(m[2].strip()) <= {"-", " "}:
            label = m[1].strip()
            rows[canonicalize_name(label.strip("`").split("[")[0])] = (label, m[2].strip())
    return rows


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_each_runtime_dependency_row_shows_its_bound_and_its_locked_version(
    req: Requirement,
) -> None:
    row = _runs_on_rows().get(canonicalize_name(req.name))
    assert row, f'README "Runs on" has no row for {req.name}'
    label, cell = row
    low, high = _lower_bound(req), _one(_pins("run.txt"), req.name, "run.txt")
    m = re.fullmatch(r"(\S+) \.\. (\S+)", cell)
    assert m, f'README "Runs on" row {label}: "{cell}" is not "<lowest> .. <locked>"'
    assert Version(m[1]) == low, (
        f'README "Runs on" row {label} starts at {m[1]}; pyproject.toml says >={low}'
    )
    assert Version(m[2]) == high, (
        f'README "Runs on" row {label} ends at {m[2]}; requirements/run.txt locks {high}'
    )


def test_the_python_row_is_the_lowest_python_pyproject_allows() -> None:
    rows = _runs_on_rows()
    assert "python" in rows, 'README "Runs on" has no Python row'
    requires = str(_project()["requires-python"])
    assert requires.startswith(">="), requires
    assert rows["python"][1].split()[0] == requires[2:], (
        f'README "Runs on" row Python: "{rows["python"][1]}", pyproject requires {requires}'
    )


@pytest.mark.parametrize("req", [*_requirements(), *_requirements("dev")], ids=lambda r: r.name)
def test_the_lowest_lock_pins_each_direct_dependency_at_its_bound(req: Requirement) -> None:
    # .ci/lowest installs requirements/lowest.txt: a bound it does not pin goes untested.
    pinned = _one(_pins("lowest.txt"), req.name, "lowest.txt")
    assert pinned == _lower_bound(req), (
        f"requirements/lowest.txt pins {req.name}=={pinned} but pyproject.toml says "
        f">={_lower_bound(req)}: raise the bound to what resolves, or run `make lock`"
    )


@pytest.mark.parametrize(("lock", "group"), [("run.txt", None), ("dev.txt", "dev")])
def test_the_locks_satisfy_pyproject(lock: str, group: str | None) -> None:
    pins = _pins(lock)
    for req in _requirements(group):
        version = _one(pins, req.name, lock)
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements/{lock} pins {req.name}=={version}, outside {req}: run `make lock`"
        )


@pytest.mark.parametrize(("smaller", "larger"), [("run.txt", "dev.txt"), ("dev.txt", "bench.txt")])
def test_each_lock_extends_the_one_below_at_the_same_versions(smaller: str, larger: str) -> None:
    # `make test` must test exactly what `make run` installs.
    small, large = _pins(smaller), _pins(larger)
    differ = {name: (v, large.get(name)) for name, v in small.items() if large.get(name) != v}
    assert not differ, f"requirements/{larger} differs from {smaller} on {differ}"
