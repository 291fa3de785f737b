"""``python -m bench.smtp_concurrency``: the adaptive SMTP limit against a fixed pool, same run.

One ``orderflow email worker`` (``--concurrency 32``: a pool of 16 connections) drains
a backlog of orders into Postfix's ``smtp-sink`` (C, PIPELINING: a fast server), once
with ``ORDERFLOW_SMTP_CONCURRENCY=adaptive`` and once with ``fixed`` per round, the
order alternating between rounds. Emails per second are counted from the first
``email.sent`` to the last (the worker's start-up left out); the adaptive limit is
read from the worker's ``orderflow_email_smtp_concurrency_limit`` gauge while it
runs. Prints the medians and their ratio, adaptive first.

``--sink`` chooses the server: ``smtp-sink`` (the default), ``slow`` (also
``--slow``: an aiosmtpd server in another process that parses each message with the
stdlib ``email`` package, one at a time: the chaos suite's slow server) or
``embedded`` (``orderflow mail sink``, the sink ``orderflow up`` runs: a Maildir,
each ``250`` after its message's group fsync). ``--up`` runs the whole ``orderflow
up`` stack instead (:func:`orderflow.cli.up.start_stack`: its Redis with AOF, the
embedded sink, the API and two email workers) and counts the Maildir's growth while
its workers drain the backlog, XADDed to its orders stream. ``--e2e`` runs bench case
3's saturation instead (:func:`bench.case_end_to_end.run` without its peers: orders
POSTed to the API as fast as it answers, 2 email workers, then 1 with the other
paused, on one ``orderflow up`` stack for ``--seconds`` each) per mode and round, and
prints emails/s with 2 and 1 workers and their ratio, the load average beside each.

Needs ``smtp-sink`` (Debian's ``postfix`` package; install it with debconf's "No
configuration") for the default sink.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from bench.common import flat_fields, order_message
from orderflow.cli.up import start_stack
from orderflow.config import Settings
from orderflow.embedded.redis_server import RedisServer, free_port

ORDERFLOW = str(Path(sys.executable).parent / "orderflow")
MODES = ("adaptive", "fixed")
SINKS = ("smtp-sink", "slow", "embedded")
LIMIT_GAUGE = "orderflow_email_smtp_concurrency_limit{"
#: What each server is called in the summary.
DESCRIBED = {
    "smtp-sink": "smtp-sink",
    "slow": "aiosmtpd parsing each message",
    "embedded": "the embedded sink (orderflow mail sink)",
    "up": "orderflow up (2 email workers, the embedded sink)",
}

#: The slow server: aiosmtpd parsing each message (run with ``python -c``).
SLOW_SERVER = """
import asyncio, email, email.policy, sys
from aiosmtpd.smtp import SMTP
class Handler:
    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        dict(message.items())
        for part in message.walk():
            if not part.is_multipart():
                part.get_content()
        return "250 OK"
async def main():
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(Handler()), "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _env(**values: str) -> dict[str, str]:
    """This environment without any ORDERFLOW_ setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERFLOW_")}
    env.update(values)
    return env


def _sink(port: int, sink: str, data_dir: str) -> subprocess.Popen[bytes]:
    if sink == "slow":
        return subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port)])
    if sink == "embedded":
        return subprocess.Popen(
            [ORDERFLOW, "mail", "sink", "--port", str(port)],
            env=_env(ORDERFLOW_DATA_DIR=data_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(binary).exists():
        raise SystemExit("smtp-sink not found: apt-get install postfix (No configuration)")
    return subprocess.Popen([binary, "-u", "nobody", f"127.0.0.1:{port}", "1000"])


def _listening(port: int, within_s: float = 30.0) -> None:
    """Wait until something accepts connections on ``port``."""
    import socket

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {within_s} s")


def _limit(metrics_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(LIMIT_GAUGE):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def _backlog(client: redis.Redis, count: int, first_id: int = 0) -> None:
    """``count`` orders in the orders stream, read by the email service's group from 0."""
    try:
        client.xgroup_create("orders", "email-service", id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    pipe: Any = client.pipeline(transaction=False)
    for i in range(first_id, first_id + count):
        pipe.execute_command("XADD", "orders", "*", *flat_fields(order_message(i)))
    pipe.execute()


def _rate(
    what: str,
    count: int,
    sent: Callable[[], int],
    alive: Callable[[], bool],
    metrics_ports: list[int],
) -> tuple[float, list[int]]:
    """Emails/s from the first to the ``count``-th sent, and the limits seen meanwhile."""
    first: tuple[float, int] | None = None
    limits: list[int] = []
    deadline = time.monotonic() + 600
    while (done := sent()) < count:
        if time.monotonic() > deadline or not alive():
            raise SystemExit(f"{what}: only {done} of {count} emails sent")
        if first is None and done:
            first = (time.monotonic(), done)
        if first is not None:
            limits.extend(x for port in metrics_ports if (x := _limit(port)) is not None)
        time.sleep(0.05)
    assert first is not None
    return (count - first[1]) / (time.monotonic() - first[0]), limits


def one_run(mode: str, count: int, sink: str) -> tuple[float, list[int]]:
    """Emails/s of one worker draining ``count`` orders, and the limits seen meanwhile."""
    with tempfile.TemporaryDirectory(prefix="orderflow-smtp-limit-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False, die_with_parent=True)
        server.start()
        smtp_port, metrics_port = free_port(), free_port()
        server_process = _sink(smtp_port, sink, tmp)
        worker: subprocess.Popen[bytes] | None = None
        client = redis.Redis.from_url(server.url)
        try:
            _listening(smtp_port)
            _backlog(client, count)
            env = _env(
                ORDERFLOW_REDIS_URL=server.url,
                ORDERFLOW_SMTP_URL=f"smtp://127.0.0.1:{smtp_port}",
                ORDERFLOW_DATA_DIR=tmp,
                ORDERFLOW_SMTP_CONCURRENCY=mode,
            )
            args = ["email", "worker", "--concurrency", "32", "--metrics-port", str(metrics_port)]
            worker = subprocess.Popen(
                [ORDERFLOW, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            running = worker
            return _rate(
                mode,
                count,
                lambda: int(client.xlen("email-events")),
                lambda: running.poll() is None,
                [metrics_port],
            )
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            server_process.kill()
            server_process.wait()
            client.close()
            server.stop()


@contextmanager
def _orderflow_env(**values: str) -> Iterator[None]:
    """This process's environment without ORDERFLOW_ settings but ``values`` meanwhile
    (the ``up`` stack's children inherit it)."""
    saved, wanted = dict(os.environ), _env(**values)
    os.environ.clear()
    os.environ.update(wanted)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def up_run(mode: str, count: int) -> tuple[float, list[int]]:
    """Emails/s of an ``orderflow up`` stack's two workers draining ``count`` orders
    into its embedded sink, and the limits seen meanwhile."""
    return asyncio.run(_up_run(mode, count))


async def _up_run(mode: str, count: int) -> tuple[float, list[int]]:
    with tempfile.TemporaryDirectory(prefix="orderflow-smtp-limit-up-") as tmp:
        with _orderflow_env(ORDERFLOW_SMTP_CONCURRENCY=mode):
            settings = Settings(
                data_dir=Path(tmp), redis_url=None, database_url=None, smtp_url=None
            )
            stack = await start_stack(
                settings, port=free_port(), host="127.0.0.1", workers=2, quiet=True
            )
        client = redis.Redis.from_url(stack.redis_url)
        try:
            _backlog(client, count, first_id=1_000_000)
            new = stack.mail_dir / "new"
            ports = [
                int(child.args[child.args.index("--metrics-port") + 1])
                for child in stack.supervisor.children
                if "--metrics-port" in child.args
            ]

            def sent() -> int:
                try:
                    return sum(1 for _ in os.scandir(new))
                except FileNotFoundError:
                    return 0

            return await asyncio.to_thread(_rate, mode, count, sent, lambda: True, ports)
        finally:
            client.close()
            await stack.stop()


def e2e_run(mode: str, seconds: float) -> dict[int, float]:
    """Bench case 3's saturation with ``mode``: emails/s by number of workers."""
    from bench import case_end_to_end

    with _orderflow_env(ORDERFLOW_SMTP_CONCURRENCY=mode):
        figures = asyncio.run(
            case_end_to_end.run(
                seconds=seconds, latency_seconds=1.0, worker_counts=(2, 1), peers=()
            )
        )
    return {
        int(f.extra[case_end_to_end.WORKERS]): f.value
        for f in figures
        if f.unit == "emails/s" and case_end_to_end.API_RATE in f.extra
    }


def e2e_main(rounds: int, seconds: float) -> None:
    """Adaptive and fixed, alternating, ``rounds`` times: 2 workers against 1."""
    for n in range(rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            rates = e2e_run(mode, seconds)
            two, one = rates.get(2, math.nan), rates.get(1, math.nan)
            print(
                f"round {n + 1} {mode:8} 2 workers {two:5.0f}, 1 worker {one:5.0f} emails/s "
                f"(2 / 1 = {two / one:.2f}; load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )


def main() -> None:
    """Run the rounds and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="orders per run (5000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per mode (5)")
    parser.add_argument("--sink", choices=SINKS, default="smtp-sink", help="the server")
    parser.add_argument("--slow", action="store_true", help="the same as --sink slow")
    parser.add_argument("--up", action="store_true", help="the whole orderflow up stack")
    parser.add_argument(
        "--e2e", action="store_true", help="bench case 3's saturation, 2 workers and 1"
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="with --e2e: seconds per worker count (8)"
    )
    args = parser.parse_args()
    if args.e2e:
        e2e_main(args.rounds, args.seconds)
        return
    sink = "slow" if args.slow else args.sink
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for n in range(args.rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            rate, limits = up_run(mode, args.count) if args.up else one_run(mode, args.count, sink)
            rates[mode].append(rate)
            seen = (
                f"limit: mean {statistics.mean(limits):.1f}, at the maximum "
                f"{sum(1 for x in limits if x == max(limits)) / len(limits):.0%} of the time"
                if limits
                else ""
            )
            print(f"round {n + 1} {mode:8} {rate:7.0f} emails/s  {seen}", flush=True)
    adaptive, fixed = (statistics.median(rates[mode]) for mode in MODES)
    what = "up" if args.up else sink
    workers = "two workers" if args.up else "one worker"
    print(
        f"\n{DESCRIBED[what]}, {args.rounds} rounds of {args.count} orders, {workers} "
        f"(concurrency 32):\nadaptive / fixed = {adaptive / fixed:.2f}  (medians: adaptive "
        f"{adaptive:.0f}, fixed {fixed:.0f} emails/s; load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
