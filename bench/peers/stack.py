"""Starting a peer stack as processes, as ``orderflow up`` starts orderflow's.

One peer stack: its own embedded Redis (AOF everysec, as ``orderflow up`` runs it), the
same SMTP sink process (``orderflow mail sink``, Maildir and fsync) in its own data dir,
``consumers`` consumer processes and one API process, each a ``python -m`` child that
dies with this process. Nothing starts at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bench.peers import GROUP, STREAM
from orderflow.embedded.redis_server import RedisServer, free_port
from orderflow.process import die_with_parent

#: The repository's root: children import ``bench`` from it.
ROOT = Path(__file__).resolve().parents[2]
#: Peers by name: the module that runs its ``api`` and ``consumer`` commands.
MODULES = {
    "minimal": "bench.peers.minimal_stack",
    "faststream": "bench.peers.faststream_stack",
}


class PeerError(RuntimeError):
    """A peer stack did not start; the message names the process and its log."""


@dataclass
class _Process:
    name: str
    args: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    async def start(self, env: dict[str, str]) -> None:
        self._log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *self.args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    async def stop(self, within_s: float = 5.0) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), within_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self._log is not None:
            self._log.close()


@dataclass
class PeerStack:
    """A running peer: where to POST, where its emails land, whose CPU counts."""

    peer: str
    data_dir: Path
    api_url: str
    redis: RedisServer
    processes: list[_Process]

    @property
    def mail_dir(self) -> Path:
        """The sink's Maildir."""
        return self.data_dir / "mail"

    def pids(self) -> dict[str, int]:
        """Process id by name, Redis included."""
        pids = {p.name: p.process.pid for p in self.processes if p.process is not None}
        if self.redis.pid is not None:
            pids["redis"] = self.redis.pid
        return pids

    @property
    def redis_url(self) -> str:
        """The peer's own Redis."""
        return self.redis.url

    async def stop(self) -> None:
        """Stop the API, the consumers and the sink, then Redis."""
        for process in reversed(self.processes):
            await process.stop()
        await asyncio.to_thread(self.redis.stop)


async def start(peer: str, data_dir: Path, *, consumers: int) -> PeerStack:
    """Start peer ``peer`` (a key of :data:`MODULES`) in ``data_dir``; stop it when done."""
    module = MODULES[peer]
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(data_dir / "redis", die_with_parent=True)
    await asyncio.to_thread(redis.start)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["ORDERFLOW_DATA_DIR"] = str(data_dir)
    sink_port, api_port = free_port(), free_port()
    common = ["--redis-url", redis.url]
    processes = [
        _Process(
            "mail-sink",
            ["orderflow", "mail", "sink", "--port", str(sink_port)],
            logs / "mail-sink.log",
        )
    ]
    processes += [
        _Process(
            f"consumer-{n}",
            [module, "consumer", *common, "--smtp-port", str(sink_port), "--name", f"c{n}"],
            logs / f"consumer-{n}.log",
        )
        for n in range(1, consumers + 1)
    ]
    processes.append(
        _Process(
            "api",
            [module, "api", *common, "--port", str(api_port), "--db", str(data_dir / "orders.db")],
            logs / "api.log",
        )
    )
    stack = PeerStack(peer, data_dir, f"http://127.0.0.1:{api_port}", redis, processes)
    try:
        # The sink first (the consumers connect to it at start), then the rest at once;
        # ready once the API answers and the group exists (FastStream creates it at "$":
        # an order published before would never be read).
        await processes[0].start(env)
        await _wait_port(sink_port, processes[0])
        for process in processes[1:]:
            await process.start(env)
        await _wait_group(redis.url, processes[1:-1])
        await _wait_healthy(stack.api_url, processes[-1])
    except BaseException:
        await stack.stop()
        raise
    return stack


def _check_alive(process: _Process) -> None:
    assert process.process is not None
    if process.process.returncode is not None:
        log = process.log_path.read_text(errors="replace")[-2000:]
        raise PeerError(
            f"{process.name} exited ({process.process.returncode}); {process.log_path}:\n{log}"
        )


async def _wait_port(port: int, process: _Process, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            _check_alive(process)
            if time.monotonic() > deadline:
                raise PeerError(f"{process.name} did not listen on {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def _wait_group(url: str, processes: list[_Process], within_s: float = 60.0) -> None:
    """Until the consumers' group exists (a consumer joins it only once entries come)."""
    client = aioredis.Redis.from_url(url)
    deadline = time.monotonic() + within_s
    try:
        while True:
            try:
                groups = await client.xinfo_groups(STREAM)
            except RedisError:  # no stream yet
                groups = []
            if any(g["name"] in (GROUP, GROUP.encode()) for g in groups):
                return
            for process in processes:
                _check_alive(process)
            if time.monotonic() > deadline:
                raise PeerError(f"no consumer created group {GROUP} of stream {STREAM}")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _wait_healthy(url: str, process: _Process, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(_healthy, url):
        _check_alive(process)
        if time.monotonic() > deadline:
            raise PeerError(f"{process.name} did not answer {url}/health; see {process.log_path}")
        await asyncio.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
