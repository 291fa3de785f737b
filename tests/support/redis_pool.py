"""redis-servers started once for a mutation run and lent to one pytest session at a time.

mutmut runs every mutant's tests in a pytest session of its own (a fork of its main
process), so the session-scoped ``shared_redis`` fixture would start and stop a
redis-server per mutant: thousands in a run. ``tests/mutation/run.py`` starts a few
servers first (one per mutant run at once, and one spare), writes their ports in a
directory and names that directory in ``$ORDERFLOW_TEST_REDIS_POOL``; a session then
borrows a free one (an exclusive ``flock`` on its slot, released when the session ends
or its process dies) and gets it as new: keys, scripts, functions and statistics
emptied. Sessions never share a server at once, so a test sees only its own commands.
Tests that kill, restart or reconfigure Redis keep a server of their own
(``redis_server``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import ResponseError

from orderflow.embedded.redis_server import RedisServer

#: The pool's directory; set by the mutation runner only.
POOL_ENV = "ORDERFLOW_TEST_REDIS_POOL"

#: How the test servers appear in /proc/<pid>/status.
SERVER_NAMES = ("Name:\tredis-server", "Name:\tvalkey-server")


def start_pool(directory: Path, size: int) -> list[RedisServer]:
    """Start ``size`` servers (no persistence) and record their ports in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    servers: list[RedisServer] = []
    try:
        for slot in range(size):
            server = RedisServer(directory / f"slot-{slot}", appendonly=False, die_with_parent=True)
            server.start()
            servers.append(server)
            (directory / f"slot-{slot}.port").write_text(str(server.port))
    except BaseException:
        stop_pool(servers)
        raise
    return servers


def stop_pool(servers: list[RedisServer]) -> None:
    """Stop the pool's servers."""
    for server in servers:
        server.stop()


@dataclass
class Borrowed:
    """A pool server held by this session: its URL and port, and the held lock."""

    port: int
    lock_fd: int

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        return f"redis://127.0.0.1:{self.port}/0"


def reset(url: str) -> None:
    """Make a lent server look new: no keys, no cached scripts or functions, no stats."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.flushall()
        client.script_flush()
        with contextlib.suppress(ResponseError):  # FUNCTION came with Redis 7.0
            client.function_flush()
        client.config_resetstat()
    finally:
        client.close()


def borrow(directory: Path) -> Borrowed | None:
    """Hold a free server of the pool, reset; None when every slot is taken."""
    for port_file in sorted(directory.glob("slot-*.port")):
        fd = os.open(port_file.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        borrowed = Borrowed(int(port_file.read_text()), fd)
        try:
            reset(borrowed.url)
        except BaseException:
            os.close(fd)
            raise
        return borrowed
    return None


def give_back(borrowed: Borrowed) -> None:
    """Release the slot (closing the lock's descriptor releases it)."""
    os.close(borrowed.lock_fd)


@contextlib.contextmanager
def lent_server(directory: Path) -> Iterator[Borrowed | None]:
    """``borrow`` for the length of a ``with`` block."""
    borrowed = borrow(directory)
    try:
        yield borrowed
    finally:
        if borrowed is not None:
            give_back(borrowed)


def adopt_orphans() -> bool:
    """Make this process the child subreaper of everything it starts (Linux only).

    A pytest session that mutmut stops at its deadline (or that pytest-timeout ends with
    ``os._exit``) leaves the redis-servers its tests started: they then become children
    of this process instead of init's, so ``orphans_of`` can tell this run's from every
    other redis-server on the machine. (The servers' environment cannot tell: redis-server
    writes its process title over it.) False where the call does not exist.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_child_subreaper = 36
    return bool(ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)


def orphans_of(parent: int, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Pids of redis-servers whose parent is now ``parent`` (its subreaper), but ``keep``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in keep:
            continue
        try:
            status = (proc / "status").read_text()
        except OSError:
            continue
        if status.startswith(SERVER_NAMES) and f"\nPPid:\t{parent}\n" in status:
            found.append(int(proc.name))
    return found


def kill_orphans(keep: set[int] | frozenset[int] = frozenset()) -> int:
    """SIGKILL and reap the redis-servers this process adopted, but ``keep``; how many.

    Only servers: the runner's own children (mutmut, in another lane) are reaped by
    their ``subprocess`` call, which must see their exit status."""
    pids = orphans_of(os.getpid(), keep)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return len(pids)
