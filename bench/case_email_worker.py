"""Case 7: one email worker against a minimal one, both sending to Postfix's ``smtp-sink``.

Each contender drains real ``order.created`` version 2 events (built by the Order
Service's own ``order_event`` from a stored order, appended by orderflow's
``StreamPublisher``) from a stream of its own on the bench's private Redis, in a process
of its own pinned to the client core, sending every confirmation to the same
``smtp-sink`` (Postfix's C test server: PIPELINING, no disk, pinned to the server core):

* ``orderflow email worker``, started as the CLI runs it (``python -m orderflow email
  worker``, concurrency 32): ledger claim, render, SMTP, ledger mark + ``email.sent``;
* a minimal worker (:func:`minimal_worker`): redis-py's XREADGROUP (COUNT 100), each
  order parsed with ``json`` and written as an ``email.message.EmailMessage`` with a
  text body, sent by aiosmtplib on one of 32 connections, acks batched; no ledger, no
  events, no validation, no HTML part (orderflow sends text and HTML alternatives:
  ``add_alternative`` would double the minimal worker's CPU per email, so leaving it
  out makes the baseline the harder one to beat, and the one issue 17 measured).

Each run waits until :data:`WARM` entries are acknowledged (imports, connections), then
measures for ``seconds``: acknowledged entries per second (``XINFO GROUPS``: read minus
pending, polled), and each process's CPU (``/proc``: the worker's, the sink's and
Redis's) per email. Runs alternate between the two contenders so that a burst of load
from other processes falls on both; the figure is the median.

``smtp-sink`` comes with Debian's ``postfix`` package; when missing it is installed
(``apt-get``, as root, debconf's "No configuration": nothing of Postfix runs). Run alone
with ``python -m bench --only email-worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.common import SERVER_CPU, Figure, can_pin, median
from orderflow.bus import Retention, StreamPublisher, connect
from orderflow.embedded.redis_server import free_port
from orderflow.orders.events import order_event
from orderflow.orders.repository import StoredOrder

CASE = "email worker"
ORDERFLOW = "orderflow email worker, concurrency 32"
MINIMAL = "minimal worker (redis-py + EmailMessage + aiosmtplib)"
#: Connections (and sends in flight) of the minimal worker.
CONNECTIONS = 32
#: Entries acknowledged before the measured window starts (imports, connections, JIT-free
#: warm caches).
WARM = 300
#: ``Figure.extra`` keys: CPU per email of each process, in µs.
CPU_WORKER = "worker CPU µs/email"
CPU_SINK = "smtp-sink CPU µs/email"
CPU_REDIS = "redis CPU µs/email"
#: The worker's share of a core over the window, in %.
WORKER_CORE = "worker CPU %"
SMTP_SINK = Path("/usr/sbin/smtp-sink")
MAIL_FROM = "orderflow <orders@orderflow.localhost>"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """One contender's measured window."""

    emails_per_s: float
    worker_cpu_us: float
    sink_cpu_us: float
    redis_cpu_us: float
    worker_pct: float


def smtp_sink_path() -> tuple[Path | None, str]:
    """``smtp-sink``, installed from Debian's ``postfix`` when missing; else None and why."""
    found = shutil.which("smtp-sink")
    if found:
        return Path(found), ""
    if SMTP_SINK.exists():
        return SMTP_SINK, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "smtp-sink missing (Debian package postfix) and not root to install it"
    print("  installing postfix for smtp-sink (apt-get, 'No configuration') ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["debconf-set-selections"],
        input="postfix postfix/main_mailer_type select No configuration\n",
        text=True,
        env=env,
        capture_output=True,
        check=False,
    )
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # The package lists may be missing or stale: refresh them once and try again.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not SMTP_SINK.exists():
        return None, f"apt-get install postfix failed: {done.stderr[-300:]}"
    return SMTP_SINK, ""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


async def _wait_listening(port: int, process: asyncio.subprocess.Process, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not listen on {port}") from None
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _smtp_sink(path: Path, pin: bool) -> Any:
    """``smtp-sink -u nobody 127.0.0.1:PORT 1000`` on the server core; yields its port
    and pid."""
    port = free_port()
    command = [str(path), "-u", "nobody", f"127.0.0.1:{port}", "1000"]
    if pin:
        command = ["taskset", "-c", str(SERVER_CPU), *command]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await _wait_listening(port, process, within_s=10)
        yield port, process.pid
    finally:
        await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.returncode is None:
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        process.kill()
        await process.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def _stored_order(order_id: int) -> StoredOrder:
    """A stored order like the end-to-end case's: two priced lines, a customer name."""
    return StoredOrder(
        id=order_id,
        email=f"customer{order_id:07d}@example.com",
        total=Decimal("123.45"),
        currency="USD",
        items=[
            {"name": "Widget", "sku": "SKU-1042", "quantity": 2, "price": "49.90"},
            {"name": "Gadget", "sku": "SKU-0007", "quantity": 1, "price": "23.65"},
        ],
        created_at=datetime(2026, 11, 26, 21, 36, 19, 123000, tzinfo=UTC),
        customer_name="Customer Name",
    )


async def preload(
    redis: aioredis.Redis, stream: str, group: str, *, first_id: int, count: int
) -> None:
    """Append ``count`` version 2 ``order.created`` events, as the relay does; a group at 0."""
    publisher = StreamPublisher(redis, retention=Retention(maxlen=10 * count))
    for start in range(first_id, first_id + count, 1000):
        ids = range(start, min(first_id + count, start + 1000))
        await publisher.publish_many(stream, [order_event(_stored_order(i), 2) for i in ids])
    await redis.xgroup_create(stream, group, id="0")


async def _acked(redis: aioredis.Redis, stream: str, group: str) -> int:
    groups: Any = await redis.xinfo_groups(stream)
    for info in groups:
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return int(info["entries-read"] or 0) - int(info["pending"])
    return 0


async def _measure(
    command: list[str],
    env: dict[str, str],
    redis: aioredis.Redis,
    *,
    stream: str,
    group: str,
    count: int,
    seconds: float,
    sink_pid: int,
    redis_pid: int,
    log: Path,
) -> Run:
    """Start a worker process on the preloaded stream; measure it once warm."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=fd, stderr=subprocess.STDOUT
        )
    finally:
        os.close(fd)
    try:
        deadline = time.monotonic() + 60
        while (acked := await _acked(redis, stream, group)) < WARM:
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[2:4]} did not start; its output: {_tail(log)}")
            await asyncio.sleep(0.02)
        pids = {"worker": process.pid, "sink": sink_pid, "redis": redis_pid}
        started = time.perf_counter()
        cpu0 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        acked0 = acked
        while time.perf_counter() - started < seconds and acked < count:
            await asyncio.sleep(0.02)
            acked = await _acked(redis, stream, group)
        elapsed = time.perf_counter() - started
        cpu = {name: _cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        await _stop(process)
    emails = acked - acked0
    if emails <= 0:
        raise RuntimeError(f"no email sent in the window: see {log}")
    return Run(
        emails / elapsed,
        cpu["worker"] / emails * 1e6,
        cpu["sink"] / emails * 1e6,
        cpu["redis"] / emails * 1e6,
        cpu["worker"] / elapsed * 100,
    )


async def run(url: str, *, count: int, seconds: float, repeats: int) -> list[Figure]:
    """Each contender ``repeats`` times (alternating), each on ``count`` preloaded events."""
    path, why = smtp_sink_path()
    if path is None:
        return [
            Figure(CASE, name, float("nan"), "emails/s", note=why) for name in (ORDERFLOW, MINIMAL)
        ]
    redis = connect(url)
    runs: dict[str, list[Run]] = {ORDERFLOW: [], MINIMAL: []}
    redis_pid = int((await redis.info("server"))["process_id"])
    try:
        with tempfile.TemporaryDirectory(prefix="orderflow-bench-email-") as tmp:
            async with _smtp_sink(path, can_pin()) as (port, sink_pid):
                order = [ORDERFLOW, MINIMAL]
                for k in range(repeats):
                    for name in order if k % 2 == 0 else order[::-1]:
                        runs[name].append(
                            await _one(
                                name,
                                url,
                                redis,
                                port,
                                count=count,
                                seconds=seconds,
                                run=len(runs[ORDERFLOW]) + len(runs[MINIMAL]),
                                sink_pid=sink_pid,
                                redis_pid=redis_pid,
                                tmp=Path(tmp),
                            )
                        )
    finally:
        await _forget_ledger(redis)
        await redis.aclose()
    return [_figure(name, rates) for name, rates in runs.items()]


async def _one(
    name: str,
    url: str,
    redis: aioredis.Redis,
    smtp_port: int,
    *,
    count: int,
    seconds: float,
    run: int,
    sink_pid: int,
    redis_pid: int,
    tmp: Path,
) -> Run:
    tag = uuid.uuid4().hex[:8]
    stream, events, group = f"bench:email:{tag}", f"bench:email-events:{tag}", "email-service"
    # Order ids of their own per run: the ledger remembers every order it sent.
    await preload(redis, stream, group, first_id=(run + 1) * 10_000_000, count=count)
    if name == ORDERFLOW:
        command = [sys.executable, "-m", "orderflow", "email", "worker", "--concurrency", "32"]
        env = {
            **os.environ,
            "ORDERFLOW_REDIS_URL": url,
            "ORDERFLOW_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
            "ORDERFLOW_STREAM": stream,
            "ORDERFLOW_GROUP": group,
            "ORDERFLOW_EMAIL_EVENTS_STREAM": events,
            "ORDERFLOW_DATA_DIR": str(tmp / f"data-{tag}"),
        }
    else:
        command = [sys.executable, "-m", "bench.case_email_worker", "minimal", url]
        command += ["127.0.0.1", str(smtp_port), stream, group]
        env = dict(os.environ)
    try:
        return await _measure(
            command,
            env,
            redis,
            stream=stream,
            group=group,
            count=count,
            seconds=seconds,
            sink_pid=sink_pid,
            redis_pid=redis_pid,
            log=tmp / f"{tag}.log",
        )
    finally:
        await redis.delete(stream, events)


async def _forget_ledger(redis: aioredis.Redis) -> None:
    keys = [key async for key in redis.scan_iter(match="orderflow:email:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await redis.delete(*keys[start : start + 1000])


def _figure(name: str, runs: list[Run]) -> Figure:
    return Figure(
        CASE,
        name,
        median([r.emails_per_s for r in runs]),
        "emails/s",
        note=f"{len(runs)} runs: " + ", ".join(f"{r.emails_per_s:,.0f}" for r in runs),
        extra={
            CPU_WORKER: median([r.worker_cpu_us for r in runs]),
            CPU_SINK: median([r.sink_cpu_us for r in runs]),
            CPU_REDIS: median([r.redis_cpu_us for r in runs]),
            WORKER_CORE: median([r.worker_pct for r in runs]),
        },
    )


# --- the minimal worker, in its own process ---------------------------------------------


def _body(data: dict[str, Any]) -> str:
    """The confirmation's text, as a minimal worker would write it."""
    name = data["customer"].get("name") or "customer"
    lines = "".join(
        f"{line['quantity']} x {line['name']}  {line.get('unit_price', '')}\n"
        for line in data["lines"]
    )
    return (
        f"Hello {name},\n\nThank you for your order #{data['id']}.\n\n{lines}\n"
        f"Total: {data['total']} {data['currency']}\n"
    )


async def minimal_worker(url: str, host: str, port: int, stream: str, group: str) -> None:
    """Read, build an EmailMessage, send on one of 32 connections, ack in batches."""
    import aiosmtplib

    redis = aioredis.Redis.from_url(url)
    queue: asyncio.Queue[tuple[bytes, dict[bytes, bytes]]] = asyncio.Queue(CONNECTIONS * 4)
    done: list[bytes] = []
    wake = asyncio.Event()

    async def send_loop() -> None:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname="localhost")
        await smtp.connect()
        while True:
            entry_id, fields = await queue.get()
            data = json.loads(fields[b"data"])
            message = EmailMessage()
            message["From"] = MAIL_FROM
            message["To"] = data["customer"]["email"]
            message["Subject"] = f"Order #{data['id']} confirmed"
            message["Message-ID"] = f"<order-{data['id']}@orderflow.localhost>"
            message.set_content(_body(data))
            await smtp.send_message(message)
            done.append(entry_id)
            wake.set()

    async def ack_loop() -> None:
        while True:
            await wake.wait()
            wake.clear()
            ids = done.copy()
            done.clear()
            await redis.xack(stream, group, *ids)

    tasks = [asyncio.create_task(send_loop()) for _ in range(CONNECTIONS)]
    tasks.append(asyncio.create_task(ack_loop()))
    while True:
        reply: Any = await redis.xreadgroup(group, "minimal", {stream: ">"}, count=100, block=1000)
        for entry_id, fields in reply[0][1] if reply else []:
            await queue.put((entry_id, fields))
        for task in tasks:
            if task.done():
                task.result()


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.case_email_worker minimal URL HOST PORT STREAM GROUP``: the
    minimal worker, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.case_email_worker")
    parser.add_argument("mode", choices=["minimal"])
    parser.add_argument("url")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("stream")
    parser.add_argument("group")
    args = parser.parse_args(argv)
    # Nothing to flush (unacknowledged entries are only measured, never redelivered): exit
    # at once rather than wait for asyncio.run to cancel blocked reads and sends.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(minimal_worker(args.url, args.host, args.port, args.stream, args.group))


if __name__ == "__main__":
    main()
