"""How CLI commands run: on asyncio's loop, their long-lived objects frozen."""

from __future__ import annotations

import asyncio
import gc

import pytest
import uvloop

from orderflow import cli
from orderflow.cli import run
from tests.support import wait_until


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_commands_run_on_asyncio_not_uvloop_even_where_installed() -> None:
    # uvloop raises RuntimeError on a write to a reset connection (see cli.run).
    loop_type = run(_loop_type())
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_long_lived_objects_are_frozen_out_of_the_collector_once_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "FREEZE_AFTER_S", (0.01,))

    async def command() -> int:
        # Polls the effect: a command running past FREEZE_AFTER_S sees a freeze.
        frozen: int = await wait_until(gc.get_freeze_count, timeout=5, what="a gc.freeze()")
        return frozen

    gc.unfreeze()
    try:
        assert run(command()) > 0
    finally:
        gc.unfreeze()


def test_a_short_command_freezes_nothing() -> None:
    gc.unfreeze()
    run(_loop_type())
    assert gc.get_freeze_count() == 0
