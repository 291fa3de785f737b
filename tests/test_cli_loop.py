"""How CLI commands run: on uvloop where installed, their long-lived objects frozen."""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest
import uvloop

from orderflow import cli
from orderflow.cli import run


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_commands_run_on_uvloop_where_installed() -> None:
    assert run(_loop_type()) is uvloop.Loop


def test_commands_run_on_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    loop_type = run(_loop_type())
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_long_lived_objects_are_frozen_out_of_the_collector_once_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "FREEZE_AFTER_S", (0.01,))

    async def command() -> int:
        await asyncio.sleep(0.1)
        return gc.get_freeze_count()

    gc.unfreeze()
    try:
        assert run(command()) > 0
    finally:
        gc.unfreeze()


def test_a_short_command_freezes_nothing() -> None:
    gc.unfreeze()
    assert run(_loop_type()) is uvloop.Loop
    assert gc.get_freeze_count() == 0
