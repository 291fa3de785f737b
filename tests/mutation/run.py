"""`make mutation`: mutmut over the modules every delivery guarantee rests on.

Each module runs in its own scratch copy of the project (``.mutation/<module>/``) with
only its targeted tests, so one module can be run alone (``make mutation MODULE=ledger``)
and a finished module keeps its results when the next one is interrupted. mutmut 3
remembers finished mutants there: a second run re-tests only what changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orderflow.embedded.redis_server import RedisServer
from tests.mutation import fast_first
from tests.support import redis_pool

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = ROOT / ".mutation"


@dataclass(frozen=True)
class Target:
    """One mutated area: the source files mutmut changes and the tests that judge them."""

    sources: tuple[str, ...]
    tests: tuple[str, ...]
    #: Functions of those files left out of the figure (docs/MUTATION.md says why);
    #: mutmut still mutates them, their results are listed apart.
    skip: tuple[str, ...] = ()
    #: pytest-timeout per test, seconds: a mutant that hangs a test counts as killed once
    #: it runs out, so a target whose tests each take a second or two can set it lower.
    timeout_s: int = 60
    #: Regular expressions of source lines mutmut leaves alone: only lines every mutant
    #: of which is equivalent (docs/MUTATION.md says which and why). Each such mutant
    #: would survive by running every test that reaches its function.
    do_not_mutate: tuple[str, ...] = ()
    #: mutmut's wall-clock limit per mutant is (its tests' recorded time + 1 s) times
    #: this (mutmut's default: 15). A mutant that hangs outside what pytest-timeout can
    #: interrupt (an event loop that never finishes tearing down) waits all of it.
    timeout_multiplier: float = 15.0
    #: Each test's own pytest-timeout: ``timeout_floor + timeout_factor *`` its duration
    #: recorded in mutmut's stats run, at most ``timeout_s`` (``fast_first.py``). A
    #: mutant that hangs a 0.1 s test is then a kill after some 15 s, not ``timeout_s``.
    #: Not less: with a floor of 5 s, two mutants no test can tell from the original
    #: (message, ``_EntryMessage._load`` 10 and 14) were "killed" at the deadline of a
    #: 0.02 s test on this machine at load 8 (niced, a session can stall for seconds).
    timeout_factor: float = 4.0
    timeout_floor: float = 15.0
    #: How long the module takes, roughly (minutes in the last whole run): the runner
    #: starts the biggest first.
    weight: float = 1.0


#: module -> (files mutated, tests run). Tests that only drive subprocesses are left
#: out: a child process imports the unmutated package, so it can never kill a mutant.
TARGETS: dict[str, Target] = {
    "ledger": Target(
        ("src/orderflow/email/ledger.py",),
        ("tests/email/test_service.py", "tests/email/test_ledger.py"),
        weight=4,
    ),
    "message": Target(
        ("src/orderflow/bus/message.py",),
        ("tests/bus/test_message.py", "tests/bus/test_message_bounds.py"),
    ),
    "streams": Target(
        ("src/orderflow/bus/streams.py",),
        ("tests/bus/test_retention.py", "tests/bus/test_retention_edges.py"),
        # Retention is the guarantee here. The transport (one-write pipelines, XREADGROUP
        # parsing) is measured by "transport"; XTRIM ... ACKED needs Redis 8.2.
        skip=(
            "send_commands",
            "read_group",
            "_entries_of",
            "flat_fields",
            "_plain_pool",
            "_round_trip",
            "_trim_acked",
            "_supports_acked_trim",
        ),
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
        ("tests/bus/test_worker.py", "tests/bus/test_deadletter.py"),
    ),
    "relay": Target(
        ("src/orderflow/orders/relay.py", "src/orderflow/orders/outbox.py"),
        (
            "tests/orders/test_relay.py",
            "tests/orders/test_store.py",
            "tests/orders/test_outbox_lease.py",
            "tests/orders/test_relay_failures.py",
            # The relay against Redis answering XADD with an error reply (its own server).
            "tests/orders/test_relay_errors.py",
            "tests/orders/test_relay_lifecycle.py",
            # The rows a group commit hands to its process's relay (SQLite).
            "tests/orders/test_relay_handoff.py",
        ),
        # Many relay tests set up a PostgreSQL database of their own (created, migrated)
        # before they start: more room for fixtures than the other targets'.
        timeout_floor=20.0,
        weight=10,
    ),
    "ordered": Target(
        (
            "src/orderflow/bus/consume/ordered.py",
            "src/orderflow/bus/consume/partitioned.py",
            "src/orderflow/bus/consume/supervised.py",
        ),
        # In-process tests only: tests/bus/test_poison.py and tests/cluster/test_ordered.py
        # drive subprocesses or a cluster of their own (minutes), and the engine's own
        # tests never build these classes.
        (
            "tests/bus/test_ordered.py",
            "tests/bus/test_ordered_deleted.py",
            "tests/bus/test_partitioned.py",
            # Not tests/cluster/test_supervised_worker.py: its planted failure is counted on
            # the class, so it fails only in the first of mutmut's runs in one process.
            "tests/bus/test_supervised.py",
        ),
        weight=8,
    ),
    "engine": Target(
        (
            "src/orderflow/bus/consume/engine.py",
            "src/orderflow/bus/consume/heartbeat.py",
            "src/orderflow/bus/consume/config.py",
            "src/orderflow/bus/consume/competing.py",
        ),
        (
            "tests/bus/test_worker.py",
            "tests/bus/test_config.py",
            "tests/bus/test_transports.py",
            "tests/bus/test_deadletter.py",
            "tests/bus/test_engine_mutants.py",
            # Each loop against a proxy that cuts only its own command.
            "tests/bus/test_engine_outages.py",
            # Kills and restarts its own Redis under a worker in this process: the only
            # in-process test of the engine's Redis-down path (_redis_down). The file's
            # other test drives consumer subprocesses only.
            "tests/bus/test_crashes.py::test_redis_killed_and_restarted_mid_run_loses_nothing",
        ),
        # Every engine test takes three seconds at most, alone: a mutant that hangs one (a
        # stop that never comes, a lane that never ends) is a kill after 10 s, not a minute.
        timeout_s=10,
        # The names of the engine's asyncio tasks (`name="orderflow-acks"` ...): for
        # debugging only, nothing reads them.
        do_not_mutate=(r'name="orderflow-[a-z]+"\)',),
        # Its tests took 18 s at most per function when recorded (under load): a mutant
        # still running after 5 times that (95 s) hangs.
        timeout_multiplier=5.0,
        weight=20,
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
    tests = [t for t in target.tests if (ROOT / t.split("::")[0]).exists()]
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list(list(target.sources))}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        # Fastest tests first: a mutant stops at its first failing test.
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "tests.mutation.fast_first",'
        f' "--timeout={target.timeout_s}", "--timeout-method=thread",'
        f' "--mutation-timeout-factor={target.timeout_factor}",'
        f' "--mutation-timeout-floor={target.timeout_floor}"]\n'
        "use_git_change_detection = false\n"
        f"do_not_mutate_patterns = {_toml_list(list(target.do_not_mutate))}\n"
        f"timeout_multiplier = {target.timeout_multiplier}\n"
        f"type_check_command = {_toml_list(_type_check(target))}\n"
    )
    (work / "pyproject.toml").write_text(pyproject)
    return work


#: mypy's error codes that come from how mutmut lays its mutants out, not from a mutant:
#: its ``# type: ignore`` on every mutant table, and each mutant of ``__init__``
#: defining the instance's attributes again.
_LAYOUT_ERRORS = ("unused-ignore", "no-redef")


def _type_check(target: Target) -> list[str]:
    """mypy (strict, the project's own settings) over the mutated files, as mutmut runs it.

    A mutant mypy rejects could never land (``make lint`` runs mypy strict on every
    change), so mutmut counts it caught without running a test for it.
    """
    command = [sys.executable, "-m", "mypy", "--output", "json", "--no-incremental"]
    for code in _LAYOUT_ERRORS:
        command += ["--disable-error-code", code]
    return command + list(target.sources)


def _function(mutant: str) -> str:
    # orderflow.bus.streams.xǁStreamPublisherǁtrim__mutmut_3 -> trim;
    # orderflow.bus.streams.x_send_commands__mutmut_1 -> send_commands
    name = mutant.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    return name.rsplit("ǁ", 1)[1] if "ǁ" in name else name.removeprefix("x_")


def summarise(work: Path, target: Target) -> dict[str, Any]:
    """Counts per status for the module's figure, and the mutants not killed."""
    mutmut = str(Path(sys.executable).parent / "mutmut")
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: Counter[str] = Counter()
    left_out: Counter[str] = Counter()
    alive: list[str] = []
    for line in listing.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if not mutant:
            continue
        if _function(mutant) in target.skip:
            left_out[status] += 1
            continue
        counts[status] += 1
        if status not in (*KILLED_BY_TESTS, TYPE_CHECKED):
            alive.append(f"{mutant}: {status}")
    return figures(counts) | {"counts": dict(counts), "left_out": dict(left_out), "alive": alive}


#: mutmut's statuses of a mutant its tests failed on (a timeout: the mutant hung them).
KILLED_BY_TESTS = ("killed", "timeout")
#: mutmut's status of a mutant mypy rejected: no test ran for it.
TYPE_CHECKED = "caught by type check"


def figures(counts: Counter[str]) -> dict[str, float]:
    """``score``: mutants killed or rejected by mypy, of all checked; ``tests_score``:
    mutants killed, of those the tests ran against (mypy's left out of both sides)."""
    checked = sum(n for status, n in counts.items() if status not in ("skipped", "not checked"))
    killed = sum(counts[status] for status in KILLED_BY_TESTS)
    ran = checked - counts[TYPE_CHECKED]
    return {
        "score": round(100.0 * (killed + counts[TYPE_CHECKED]) / checked, 1) if checked else 0.0,
        "tests_score": round(100.0 * killed / ran, 1) if ran else 0.0,
    }


def table(names: list[str]) -> str:
    """The last figures of ``names`` (from their summary.json) as a Markdown table."""
    rows = [
        "| module | mutated | tests | checked | mypy | killed | survived | no tests"
        " | figure | by tests | time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        target = TARGETS[name]
        path = SCRATCH / name / "summary.json"
        mutated = ", ".join(s.removeprefix("src/orderflow/") for s in target.sources)
        tests = ", ".join(t.removeprefix("tests/") for t in target.tests)
        if not path.exists():
            rows.append(f"| {name} | {mutated} | {tests} | not run | | | | | | | |")
            continue
        summary = json.loads(path.read_text())
        counts = summary["counts"]
        total = sum(counts.values())
        checked = total - counts.get("not checked", 0)
        rows.append(
            f"| {name} | {mutated} | {tests} | {checked} of {total}"
            f" | {counts.get(TYPE_CHECKED, 0)}"
            f" | {sum(counts.get(status, 0) for status in KILLED_BY_TESTS)}"
            f" | {counts.get('survived', 0)} | {counts.get('no tests', 0)}"
            f" | **{summary['score']}%** | {summary.get('tests_score', '')}%"
            f" | {summary['seconds']} s |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the named modules (all by default) and print one line per module."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join(TARGETS)}; all by default")
    parser.add_argument(
        "--children", type=int, default=3, help="mutants tested at once in each lane"
    )
    parser.add_argument(
        "--lanes",
        type=int,
        default=2,
        help="modules run at once (each with --children mutants at a time), biggest first",
    )
    parser.add_argument(
        "--second-look",
        action="store_true",
        help="test the survivors once more (on a loaded machine a mutant can pass by luck)",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the last figures as Markdown and exit"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.modules or list(TARGETS)))
        return 0
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    # One redis-server per mutant tested at once (and a spare) for the whole run, lent
    # to each mutant's pytest session instead of a server started per session; not for
    # another ORDERFLOW_TEST_SERVER (the sessions then start their own, as before).
    pool_dir = SCRATCH / f".redis-pool-{os.getpid()}"
    env = dict(os.environ)
    servers: list[RedisServer] = []
    # The servers of sessions stopped at their deadline come back to this process.
    redis_pool.adopt_orphans()
    if os.environ.get("ORDERFLOW_TEST_SERVER", "redis7") == "redis7":
        if pool_dir.exists():
            shutil.rmtree(pool_dir)
        servers = redis_pool.start_pool(pool_dir, args.lanes * args.children + 1)
        env[redis_pool.POOL_ENV] = str(pool_dir)
    try:
        keep = frozenset(server.pid for server in servers if server.pid is not None)
        names = args.modules or list(TARGETS)
        # Biggest first, each lane taking the next when it is free: the long modules
        # start at once, and the small ones fill in around them. Each module's own
        # serial steps (mutmut's stats and clean runs, mypy) then overlap another's
        # mutants instead of leaving the machine half idle.
        queue = sorted(names, key=lambda name: -TARGETS[name].weight)
        lock = threading.Lock()
        results: list[bool] = []

        def lane() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    name = queue.pop(0)
                results.append(_run_module(name, args.children, env, keep, args.second_look))

        lanes = [threading.Thread(target=lane) for _ in range(max(1, args.lanes))]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
        return 0 if all(results) else 1
    finally:
        redis_pool.stop_pool(servers)
        shutil.rmtree(pool_dir, ignore_errors=True)


def _run_module(
    name: str, children: int, env: dict[str, str], pool: frozenset[int], second_look: bool
) -> bool:
    """One module's mutmut run; True when it ran to the end (its figure printed)."""
    mutmut = str(Path(sys.executable).parent / "mutmut")
    work = prepare(name, TARGETS[name])
    started = time.monotonic()
    log = work / "run.log"
    with log.open("w") as out:
        # Twice at most: mutmut stops when a test fails without a mutant (a test
        # that is flaky under load); the second run goes on from the first's results.
        for _ in range(2):
            run = subprocess.run(
                [mutmut, "run", "--max-children", str(children)],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                env=env,
            )
            if run.returncode == 0:
                break
            print(f"\nmutmut exited {run.returncode}; once more", file=out, flush=True)
    if run.returncode == 0 and second_look:
        # On a loaded machine a mutant can pass its tests by luck of timing (a
        # deadline met, a retry fired late): survivors are tried once more.
        alive = [m.split(": ")[0] for m in summarise(work, TARGETS[name])["alive"]]
        if alive:
            with log.open("a") as out:
                run = subprocess.run(
                    [mutmut, "run", "--max-children", str(children), *alive],
                    cwd=work,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=False,
                    env=env,
                )
    took = time.monotonic() - started
    # The temporary directories of sessions stopped at their deadline (fast_first).
    shutil.rmtree(work / "mutants" / fast_first.TMP, ignore_errors=True)
    # A mutant stopped at its deadline leaves the servers its tests started itself.
    if orphans := redis_pool.kill_orphans(pool):
        with log.open("a") as out:
            print(f"killed {orphans} orphaned redis-server(s)", file=out)
    if run.returncode != 0:
        print(f"{name}: mutmut exited {run.returncode}; see {log}", flush=True)
        return False
    summary = summarise(work, TARGETS[name]) | {"seconds": round(took)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    lines = [
        f"{name}: {summary['score']}% killed or rejected by mypy"
        f" ({summary['tests_score']}% of those the tests ran against)"
        f" {summary['counts']} in {took:.0f}s"
        + (f"; left out {summary['left_out']}" if summary["left_out"] else ""),
        *(f"    {mutant}" for mutant in summary["alive"]),
    ]
    print("\n".join(lines), flush=True)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
