"""Runs orderflow's processes side by side, restarts the ones that die, stops them all.

``orderflow up`` is a small process supervisor: each component runs as its own
``python -m orderflow …`` child (so one crash is contained and restarted), with its
output in ``<data dir>/logs/<name>.log``, and dies with its parent on Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from orderflow.process import die_with_parent

log = logging.getLogger(__name__)


class AlreadyRunning(RuntimeError):
    """Another ``orderflow up`` holds the data dir."""


class DataDirLock:
    """An exclusive lock on a data dir, held while ``orderflow up`` runs."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "up.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunning naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunning(
                f"orderflow is already running on data dir {self.path.parent} (pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Give the lock up."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@dataclass
class Child:
    """One supervised process."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    #: Stopped on purpose: not restarted until started again.
    paused: bool = False
    _log: IO[bytes] | None = field(default=None, repr=False)
    resumed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        """Start (or restart) the process, appending its output to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orderflow",
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            # Its own session: a terminal's Ctrl-C reaches `up` alone, which then
            # stops the children in order; die_with_parent covers `up` being killed.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.started_at = time.monotonic()

    def close_log(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()
            self._log = None


class Supervisor:
    """Starts children in order, restarts any that exits, stops them in reverse order."""

    def __init__(self, children: list[Child], *, stop_timeout: float = 20.0) -> None:
        self.children = children
        self.stop_timeout = stop_timeout
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every child and watch it."""
        for child in self.children:
            await child.start()
            self._watchers.append(asyncio.create_task(self._watch(child)))

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            if child.paused:
                await child.resumed.wait()
                continue
            # A child that keeps dying is restarted less and less often.
            quick = time.monotonic() - child.started_at < 5
            delay = min(10.0, 0.5 * 2 ** min(child.restarts, 5)) if quick else 0.5
            child.restarts += 1
            log.warning(
                "%s exited with %s; restarting in %.1fs (see %s)",
                child.name,
                code,
                delay,
                child.log_path,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await child.start()

    async def pause(self, name_prefix: str) -> list[Child]:
        """Stop the children whose name starts with ``name_prefix`` (SIGTERM, graceful)."""
        paused = [c for c in self.children if c.name.startswith(name_prefix)]
        for child in paused:
            child.paused = True
            child.resumed.clear()
            await _terminate(child, self.stop_timeout)
        return paused

    async def resume(self, name_prefix: str) -> None:
        """Start paused children again."""
        for child in self.children:
            if child.name.startswith(name_prefix) and child.paused:
                child.paused = False
                await child.start()
                child.resumed.set()

    def pids(self) -> list[int]:
        """The pids of the running children."""
        return [c.pid for c in self.children if c.pid is not None and c.process is not None]

    async def stop(self) -> None:
        """SIGTERM each child, last started first; SIGKILL what outlives the timeout."""
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for child in reversed(self.children):
            await _terminate(child, self.stop_timeout)
            child.close_log()


async def _terminate(child: Child, timeout: float) -> None:
    process = child.process
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
