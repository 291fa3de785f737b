"""The mutation runner's own logic (tests/mutation/): test order, kills remembered, figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.mutation import fast_first, run

ROOT = Path(__file__).resolve().parents[1]
FUNCTION = "orderflow.bus.consume.engine.xǁEngineǁ_claim"


def test_a_mutant_belongs_to_its_function_and_a_plain_run_to_none() -> None:
    assert fast_first.mutated_function(f"{FUNCTION}__mutmut_12") == FUNCTION
    assert fast_first.mutated_function("orderflow.x_f__mutmut_3") == "orderflow.x_f"
    # mutmut's clean and forced-fail runs: nothing to remember.
    assert fast_first.mutated_function("") == ""
    assert fast_first.mutated_function("fail") == ""


def test_tests_that_killed_the_function_before_come_first_then_the_fastest() -> None:
    durations = {"slow_killer": 4.0, "quick_killer": 1.0, "fast": 0.1, "medium": 0.5}
    kills = Counter({"slow_killer": 8, "quick_killer": 1})
    order = fast_first.run_order(
        ["medium", "new", "quick_killer", "fast", "slow_killer"], durations, kills
    )
    # Killers by seconds per kill (0.5 then 1.0), then the rest fastest first, the
    # unknown test last.
    assert order == ["slow_killer", "quick_killer", "fast", "medium", "new"]
    assert fast_first.run_order(["medium", "new", "fast"], durations, Counter()) == [
        "fast",
        "medium",
        "new",
    ]


def test_kills_are_read_per_function_and_a_line_cut_short_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "kills.jsonl"
    assert fast_first.read_kills(path, FUNCTION) == Counter()  # no file yet
    fast_first.record_kill(path, FUNCTION, "t.py::a")
    fast_first.record_kill(path, FUNCTION, "t.py::a")
    fast_first.record_kill(path, "other", "t.py::b")
    fast_first.record_kill(path, FUNCTION, "t.py::c")
    with path.open("a") as out:
        out.write('{"function": "' + FUNCTION + '", "te')  # a session stopped mid-write
    assert fast_first.read_kills(path, FUNCTION) == Counter({"t.py::a": 2, "t.py::c": 1})


def test_the_figures_count_mypy_apart_from_the_tests() -> None:
    counts = Counter(
        {"killed": 80, "timeout": 5, "caught by type check": 100, "survived": 15, "not checked": 7}
    )
    # 185 of 200 checked; 85 of the 100 the tests ran against.
    assert run.figures(counts) == {"score": 92.5, "tests_score": 85.0}
    assert run.figures(Counter({"not checked": 3})) == {"score": 0.0, "tests_score": 0.0}


def test_the_type_check_is_mypy_as_mutmut_recognises_it() -> None:
    command = run._type_check(run.TARGETS["ledger"])
    # mutmut picks its report parser by an argument equal to "mypy".
    assert "mypy" in command
    assert command[command.index("--output") + 1] == "json"
    assert command[-1] == "src/orderflow/email/ledger.py"


def test_a_session_remembers_its_killer_and_the_next_mutant_runs_it_first(tmp_path: Path) -> None:
    (tmp_path / "test_some.py").write_text(
        "import os\n"
        "def test_fast(tmp_path):\n"
        "    with open('seen', 'a') as out: out.write(f'{tmp_path}\\n')\n"
        "def test_medium(): pass\n"
        "def test_killer():\n"
        "    assert not os.environ.get('MUTANT_UNDER_TEST')\n"
    )
    durations = {
        f"test_some.py::test_{n}": d for n, d in [("fast", 0.1), ("medium", 0.2), ("killer", 3.0)]
    }
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": durations}))

    def session(mutant: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), MUTANT_UNDER_TEST=mutant)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "tests.mutation.fast_first",
                "-p",
                "no:cacheprovider",
                "-x",
                *args,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    def ran(result: subprocess.CompletedProcess[str]) -> list[str]:
        return [
            line.split()[0]
            for line in result.stdout.splitlines()
            if line.startswith("test_some.py::")
        ]

    # The first mutant: fastest first, stopped by the killer, which is remembered.
    first = session(f"{FUNCTION}__mutmut_1", "-v")
    assert first.returncode == 1, first.stdout
    assert ran(first) == [f"test_some.py::test_{n}" for n in ("fast", "medium", "killer")]
    assert fast_first.read_kills(tmp_path / "mutmut-kills.jsonl", FUNCTION) == Counter(
        {"test_some.py::test_killer": 1}
    )
    # Its temporary directory was its own (no numbered ones shared with other sessions),
    # and it is gone with the session.
    seen = Path((tmp_path / "seen").read_text().strip())
    assert seen.parent.parent == tmp_path / "mutmut-tmp"
    assert not seen.parent.exists()
    # The next mutant of the same function: the killer first, and it is all that runs.
    second = session(f"{FUNCTION}__mutmut_2", "-v")
    assert second.returncode == 1, second.stdout
    assert ran(second) == ["test_some.py::test_killer"]
    # Another function's mutants keep the fastest-first order.
    other = session("orderflow.x_other__mutmut_1", "--collect-only", "-q")
    assert ran(other)[0] == "test_some.py::test_fast"
