"""The CLI's event loop: uvloop where installed, asyncio's otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

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
