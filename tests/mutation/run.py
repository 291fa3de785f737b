"""`make mutation`: mutmut over the modules every delivery guarantee rests on.

Each module runs in its own scratch copy of the project (``.mutation/<module>/``) with
only its targeted tests, so one module can be run alone (``make mutation MODULE=ledger``)
and a finished module keeps its results when the next one is interrupted. mutmut 3
remembers finished mutants there: a second run re-tests only what changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = ROOT / ".mutation"


@dataclass(frozen=True)
class Target:
    """One mutated area: the source files mutmut changes and the tests that judge them."""

    sources: tuple[str, ...]
    tests: tuple[str, ...]


#: module -> (files mutated, tests run). Tests that only drive subprocesses are left
#: out: a child process imports the unmutated package, so it can never kill a mutant.
TARGETS: dict[str, Target] = {
    "ledger": Target(
        ("src/orderflow/email/ledger.py",),
        ("tests/email/test_service.py", "tests/email/test_ledger.py"),
    ),
    "message": Target(
        ("src/orderflow/bus/message.py",),
        ("tests/bus/test_message.py", "tests/bus/test_message_bounds.py"),
    ),
    "streams": Target(
        ("src/orderflow/bus/streams.py",),
        ("tests/bus/test_retention.py",),
    ),
    "mime": Target(
        ("src/orderflow/email/mime.py",),
        (
            "tests/email/test_mime.py",
            "tests/email/test_mime_edges.py",
            "tests/security/test_header_injection.py",
        ),
    ),
    "deadletter": Target(
        (
            "src/orderflow/bus/consume/deadletter.py",
            "src/orderflow/bus/consume/retry.py",
            "src/orderflow/bus/consume/policy.py",
        ),
        ("tests/bus/test_worker.py", "tests/bus/test_poison.py"),
    ),
    "relay": Target(
        ("src/orderflow/orders/relay.py", "src/orderflow/orders/outbox.py"),
        ("tests/orders/test_relay.py", "tests/orders/test_store.py"),
    ),
    "engine": Target(
        (
            "src/orderflow/bus/consume/engine.py",
            "src/orderflow/bus/consume/heartbeat.py",
            "src/orderflow/bus/consume/config.py",
            "src/orderflow/bus/consume/competing.py",
        ),
        ("tests/bus/test_worker.py", "tests/bus/test_config.py", "tests/bus/test_transports.py"),
    ),
    "ordered": Target(
        (
            "src/orderflow/bus/consume/ordered.py",
            "src/orderflow/bus/consume/partitioned.py",
            "src/orderflow/bus/consume/supervised.py",
        ),
        ("tests/bus",),
    ),
}


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(name: str, target: Target) -> Path:
    """Lay the scratch copy for one module: src, tests and a pyproject with its mutmut table."""
    work = SCRATCH / name
    work.mkdir(parents=True, exist_ok=True)
    for folder in ("src", "tests"):
        # copy2 keeps mtimes: mutmut re-mutates a file only when its source changed.
        shutil.copytree(
            ROOT / folder,
            work / folder,
            dirs_exist_ok=True,
            copy_function=shutil.copy2,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    tests = [t for t in target.tests if (ROOT / t).exists()]
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list(list(target.sources))}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "--timeout=60"]\n'
        "use_git_change_detection = false\n"
    )
    (work / "pyproject.toml").write_text(pyproject)
    return work


def summarise(work: Path) -> dict[str, int]:
    """mutmut's own counts for the module (killed, survived, timeout, no_tests...)."""
    mutmut = [str(Path(sys.executable).parent / "mutmut")]
    subprocess.run([*mutmut, "export-cicd-stats"], cwd=work, check=True, capture_output=True)
    stats: dict[str, int] = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    return stats


def score(stats: dict[str, int]) -> float:
    """Killed share of the mutants that were tested (a timeout counts as killed, as mutmut does)."""
    tested = stats["total"] - stats.get("skipped", 0)
    return 100.0 * (stats["killed"] + stats.get("timeout", 0)) / tested if tested else 0.0


def main(argv: list[str] | None = None) -> int:
    """Run the named modules (all by default) and print one line per module."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join(TARGETS)}; all by default")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    mutmut = str(Path(sys.executable).parent / "mutmut")
    failed = False
    for name in args.modules or list(TARGETS):
        work = prepare(name, TARGETS[name])
        started = time.monotonic()
        log = work / "run.log"
        with log.open("w") as out:
            run = subprocess.run(
                [mutmut, "run", "--max-children", str(args.children)],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        took = time.monotonic() - started
        if run.returncode != 0:
            print(f"{name}: mutmut exited {run.returncode}; see {log}", flush=True)
            failed = True
            continue
        stats = summarise(work)
        survivors = subprocess.run(
            [mutmut, "results"], cwd=work, capture_output=True, text=True, check=False
        ).stdout
        print(f"{name}: {score(stats):.1f}% killed {json.dumps(stats)} in {took:.0f}s", flush=True)
        print(survivors, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
