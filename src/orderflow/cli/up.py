"""``orderflow up``: Redis, database, API with relay, email workers and the mail sink."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from orderflow.bus import connect, redact_url
from orderflow.bus.entries import text
from orderflow.cli.common import (
    CommandError,
    UsageError,
    describe_connection_error,
    load_settings,
    stop_on_signals,
)
from orderflow.config import REDIS_URL_FILE, Settings
from orderflow.embedded.redis_server import RedisServer, RedisServerNotFound, free_port
from orderflow.supervisor import AlreadyRunning, Child, DataDirLock, Supervisor


def register(commands: Any) -> None:
    """Add ``up``."""
    parser = commands.add_parser(
        "up", help="run everything (embedded Redis and mail sink unless configured)"
    )
    parser.add_argument("--port", type=int, help="API port (default: ORDERFLOW_API_PORT or 8000)")
    parser.add_argument("--host", help="API address (default: 127.0.0.1)")
    parser.add_argument("--workers", type=int, default=2, help="email worker processes (2)")
    parser.add_argument(
        "--status-interval", type=float, default=5.0, help="seconds between status lines"
    )
    parser.set_defaults(handler=up_command)


@dataclass
class Stack:
    """What ``up`` started, for printing and for ``demo``."""

    settings: Settings
    redis_url: str
    api_url: str
    smtp_url: str | None
    supervisor: Supervisor
    redis_server: RedisServer | None
    lock: DataDirLock

    @property
    def mail_dir(self) -> Path:
        """The embedded sink's Maildir."""
        return self.settings.mail_dir

    async def stop(self) -> None:
        """Stop children (API first), then the embedded Redis, then drop the lock."""
        await self.supervisor.stop()
        if self.redis_server is not None:
            await asyncio.to_thread(self.redis_server.stop)
            with contextlib.suppress(FileNotFoundError):
                (self.settings.data_dir / REDIS_URL_FILE).unlink()
        self.lock.release()


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything starts."""
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if not 1 <= args.workers <= 64:
        raise UsageError(f"--workers must be between 1 and 64, got {args.workers}")
    if args.status_interval <= 0:
        raise UsageError("--status-interval must be positive")


async def start_stack(
    settings: Settings, *, port: int, host: str, workers: int, quiet: bool = False
) -> Stack:
    """Start the whole system; raise CommandError (nothing left running) if it cannot."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        raise CommandError(str(exc)) from None
    redis_server: RedisServer | None = None
    supervisor: Supervisor | None = None
    try:
        if settings.redis_url is None:
            try:
                redis_server = RedisServer(
                    data_dir / "redis",
                    appendfsync=settings.redis_appendfsync,
                    die_with_parent=True,
                )
            except RedisServerNotFound as exc:
                raise CommandError(str(exc)) from None
            await asyncio.to_thread(redis_server.start)
            redis_url = redis_server.url
            (data_dir / REDIS_URL_FILE).write_text(redis_url + "\n")
        else:
            redis_url = settings.redis_url.get_secret_value()
            await _check_redis(redis_url)

        env = dict(os.environ)
        # Children get the resolved configuration, whatever the environment said.
        env.update(
            ORDERFLOW_REDIS_URL=redis_url,
            ORDERFLOW_DATA_DIR=str(data_dir),
            ORDERFLOW_API_PORT=str(port),
            ORDERFLOW_DATABASE_URL=settings.database_url_value,
        )
        if settings.smtp_url is not None:
            env["ORDERFLOW_SMTP_URL"] = settings.smtp_url.get_secret_value()
        logs = data_dir / "logs"
        children: list[Child] = []
        smtp_url: str | None = None
        if settings.smtp_url is None:
            sink_port = free_port()
            smtp_url = f"smtp://127.0.0.1:{sink_port}"
            env["ORDERFLOW_SMTP_URL"] = smtp_url
            children.append(
                Child(
                    "mail-sink",
                    ["mail", "sink", "--port", str(sink_port)],
                    env,
                    logs / "mail-sink.log",
                )
            )
        for n in range(1, workers + 1):
            worker_args = ["email", "worker", "--name", f"{socket.gethostname()}-up-{n}"]
            children.append(
                Child(
                    f"email-worker-{n}",
                    [*worker_args, "--metrics-port", str(free_port())],
                    env,
                    logs / f"email-worker-{n}.log",
                )
            )
        children.append(
            Child(
                "api",
                ["orders", "serve", "--host", host, "--port", str(port)],
                env,
                logs / "api.log",
            )
        )
        supervisor = Supervisor(children)
        await supervisor.start()
        api_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        api_url = f"http://{api_host}:{port}"
        await _wait_healthy(api_url, supervisor, within_s=60)
    except BaseException:
        if supervisor is not None:
            await supervisor.stop()
        if redis_server is not None:
            await asyncio.to_thread(redis_server.stop)
            with contextlib.suppress(FileNotFoundError):
                (data_dir / REDIS_URL_FILE).unlink()
        lock.release()
        raise
    return Stack(settings, redis_url, api_url, smtp_url, supervisor, redis_server, lock)


async def _check_redis(url: str) -> None:
    client = connect(url)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        reason = describe_connection_error(exc)
        raise CommandError(f"cannot reach Redis at {redact_url(url)}: {reason}") from None
    finally:
        await client.aclose()


async def _wait_healthy(api_url: str, supervisor: Supervisor, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        if await asyncio.to_thread(_healthy, api_url):
            return
        if time.monotonic() > deadline:
            api = supervisor.children[-1]
            raise CommandError(
                f"the API did not become healthy in {within_s:.0f}s; see {api.log_path}"
            )
        await asyncio.sleep(0.1)


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:  # noqa: S310
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def describe(stack: Stack) -> str:
    """Where everything is, for the user."""
    embedded = " (embedded, AOF " + stack.settings.redis_appendfsync + ")"
    lines = [
        "orderflow is up",
        f"  API        {stack.api_url}   docs {stack.api_url}/docs   "
        f"metrics {stack.api_url}/metrics",
        f"  Redis      {redact_url(stack.redis_url)}{embedded if stack.redis_server else ''}",
    ]
    if stack.smtp_url is not None:
        lines.append(f"  Mail       {stack.mail_dir}/new   (embedded SMTP sink, {stack.smtp_url})")
    else:
        lines.append("  Mail       sent through ORDERFLOW_SMTP_URL")
    workers = [c for c in stack.supervisor.children if c.name.startswith("email-worker")]
    ports = ", ".join(c.args[c.args.index("--metrics-port") + 1] for c in workers)
    lines += [
        f"  Workers    {len(workers)} email worker(s), metrics on 127.0.0.1 ports {ports}",
        f"  Logs       {stack.settings.data_dir.resolve()}/logs",
        "",
        f"  Try: curl -s -X POST {stack.api_url}/orders -H 'content-type: application/json' "
        """-d '{"email": "alice@example.com", "total": "100.00"}'""",
        "  Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def status_line(stack: Stack) -> str:
    """A one-line summary: published, pending, lag, dead letters, emails delivered."""
    settings = stack.settings
    client = connect(stack.redis_url)
    try:
        length = int(await client.xlen(settings.stream))
        dead = int(await client.xlen(settings.stream + ":dlq"))
        pending = lag = 0
        with contextlib.suppress(RedisError):
            for group in await client.xinfo_groups(settings.stream):
                if text(group["name"]) == settings.group:
                    pending = int(group["pending"])
                    lag = int(group.get("lag") or 0)
    finally:
        await client.aclose()
    mail = ""
    if stack.smtp_url is not None:
        new = stack.mail_dir / "new"
        count = sum(1 for _ in new.iterdir()) if new.is_dir() else 0
        mail = f" · emails in the Maildir {count}"
    return f"stream {length} · lag {lag} · pending {pending} · dead letters {dead}{mail}"


async def up_command(args: argparse.Namespace) -> int:
    """Run everything until Ctrl-C or SIGTERM, printing a short live status."""
    validate_args(args)
    settings = load_settings()
    port = args.port if args.port is not None else settings.api_port
    host = args.host or settings.api_host
    stop = asyncio.Event()
    stop_on_signals(stop)
    stack = await start_stack(settings, port=port, host=host, workers=args.workers)
    print(describe(stack), flush=True)
    last = ""
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.status_interval)
            if stop.is_set():
                break
            try:
                line = await status_line(stack)
            except (RedisError, OSError) as exc:
                line = f"Redis unavailable: {exc}"
            if line != last:
                print(f"  {time.strftime('%H:%M:%S')}  {line}", flush=True)
                last = line
    finally:
        print("stopping…", flush=True)
        await stack.stop()
    print("stopped cleanly", flush=True)
    return 0
