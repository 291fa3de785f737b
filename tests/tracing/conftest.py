"""The tracing tests' fixtures: an OTLP receiver, the SMTP server, and processes that
are killed and reaped at the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.email.conftest import smtp
from tests.tracing.receiver import Receiver

__all__ = ["smtp"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The OTLP/HTTP receiver the processes export to."""
    r = Receiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Subprocesses a test starts; any still running at the end is killed and reaped."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
