"""``orderflow``: one entry point for running and operating everything."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from orderflow import logs, tracing
from orderflow.cli import contracts, demo, email, ops, orders, pubsub, up
from orderflow.cli.common import CommandError, UsageError
from orderflow.config import ConfigError

T = TypeVar("T")
#: Seconds after a command starts when its objects are frozen out of the garbage
#: collector (see ``run``). Timers, not a "started" signal: the commands build their
#: long-lived state at different moments (uvicorn's lifespan, a worker's pools once
#: Redis answers, ``up``'s children) and none reports when it is done. Freezing early
#: or twice is harmless (objects made later are collected as usual), and a command
#: that ends within 3 s freezes nothing. The second timer catches what a slow start
#: (waiting for Redis, a cold database) built late. Commit 203832c: with it, p99 at
#: 700 orders/s went from ~80-140 ms to ~40-55 ms.
FREEZE_AFTER_S = (3.0, 15.0)

#: Modules that add a command group; each has ``register(subparsers)``.
COMMAND_MODULES = [up, demo, orders, email, ops, pubsub, contracts]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``orderflow`` command."""
    parser = argparse.ArgumentParser(
        prog="orderflow",
        description="Event-driven orders and confirmation emails on Redis Streams.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; exit codes: 0 done, 1 failed, 2 bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(args.log_level)
        # Each process names its own service (``orderflow up``'s children too).
        tracing.setup(f"orderflow-{args.command}")
    except ValueError as exc:
        parser.exit(2, f"orderflow: error: {exc}\n")
    try:
        return int(run(args.handler(args)) or 0)
    except UsageError as exc:
        parser.exit(2, f"orderflow: error: {exc}\n")
    except ValidationError as exc:
        parser.exit(2, f"orderflow: error: invalid configuration: {_first_error(exc)}\n")
    except (CommandError, ConfigError) as exc:
        print(f"orderflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run(command: Coroutine[Any, Any, T]) -> T:
    """Run a command on asyncio's event loop.

    Not on uvloop, though it would save about 15% of the CPU per order: when a peer
    resets a connection, uvloop's transports raise ``RuntimeError: unable to perform
    operation on <TCPTransport closed=True …>; the handler is closed`` from a write
    where asyncio's drop it and let the read report the loss (uvloop issues #506 and
    #685). redis-py and aiosmtplib pass that RuntimeError on as it is, so a worker
    under connection resets died instead of reconnecting (found by the network-fault
    chaos scenario).

    Once the command has started, what is alive then (modules, the app, pools, caches:
    state that lives as long as the process) is frozen out of the garbage collector
    (``gc.freeze``): each full collection walked all of it, a 30–60 ms pause in the
    API and the email workers, measured, which was most of the end-to-end p99. The
    cost: a reference cycle among frozen objects is never collected (reference
    counting still frees everything else), so the freeze waits until the start is
    over and what is alive is mostly what lives as long as the process.
    """
    with asyncio.Runner() as runner:
        for delay in FREEZE_AFTER_S:
            runner.get_loop().call_later(delay, gc.freeze)
        return runner.run(command)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}"
