"""Fault tools for processes: ``orderflow`` children that can be killed, frozen, restarted.

A SIGKILL records which TCP connections it cut: the process is frozen first
(SIGSTOP), its sockets to the given port are read from ``/proc`` (Linux), then it is
killed, so the set cannot change in between. The accounting matches those client
ports with the SMTP connections the server saw end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The ``orderflow`` command of this virtualenv.
ORDERFLOW = str(Path(sys.executable).parent / "orderflow")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_client_ports(pid: int, remote_port: int) -> set[int]:
    """The local ports of ``pid``'s TCP connections to ``remote_port`` (IPv4 and IPv6)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until the kernel reports ``pid`` stopped (state T)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout}s")


@dataclass
class Proc:
    """An ``orderflow`` child process, logging to a file; restartable."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Proc:
        """Start (again)."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [ORDERFLOW, *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` if it runs."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def kill_cutting(self, port: int) -> tuple[float, set[int]]:
        """SIGKILL and reap; returns when it stopped and its client ports to ``port``
        then (the connections the kill cut)."""
        if self.process is None or self.process.poll() is not None:
            return time.monotonic(), set()
        self.process.send_signal(signal.SIGSTOP)
        at = time.monotonic()
        _wait_stopped(self.process.pid)
        ports = tcp_client_ports(self.process.pid, port)
        self.kill()
        return at, ports

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def output(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""
