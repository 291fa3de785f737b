"""``python -m bench.smtp_concurrency``: the adaptive SMTP limit against a fixed pool, same run.

One ``orderflow email worker`` (``--concurrency 32``: a pool of 16 connections) drains
a backlog of orders into Postfix's ``smtp-sink`` (C, PIPELINING: a fast server), once
with ``ORDERFLOW_SMTP_CONCURRENCY=adaptive`` and once with ``fixed`` per round, the
order alternating between rounds. Emails per second are counted from the first
``email.sent`` to the last (the worker's start-up left out); the adaptive limit is
read from the worker's ``orderflow_email_smtp_concurrency_limit`` gauge while it
runs. Prints the medians and their ratio, adaptive first. With ``--slow`` the sink
is instead an aiosmtpd server in another process that parses each message with the
stdlib ``email`` package, one at a time (the chaos suite's slow server).

Needs ``smtp-sink`` (Debian's ``postfix`` package; install it with debconf's "No
configuration") unless ``--slow``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from bench.common import flat_fields, order_message
from orderflow.embedded.redis_server import RedisServer, free_port

ORDERFLOW = str(Path(sys.executable).parent / "orderflow")
MODES = ("adaptive", "fixed")
LIMIT_GAUGE = "orderflow_email_smtp_concurrency_limit{"

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


def _sink(port: int, slow: bool) -> subprocess.Popen[bytes]:
    if slow:
        return subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port)])
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(binary).exists():
        raise SystemExit("smtp-sink not found: apt-get install postfix (No configuration)")
    return subprocess.Popen([binary, "-u", "nobody", f"127.0.0.1:{port}", "1000"])


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


def one_run(mode: str, count: int, slow: bool) -> tuple[float, list[int]]:
    """Emails/s of one worker draining ``count`` orders, and the limits seen meanwhile."""
    with tempfile.TemporaryDirectory(prefix="orderflow-smtp-limit-") as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False, die_with_parent=True)
        server.start()
        smtp_port, metrics_port = free_port(), free_port()
        sink = _sink(smtp_port, slow)
        worker: subprocess.Popen[bytes] | None = None
        client = redis.Redis.from_url(server.url)
        try:
            client.xgroup_create("orders", "email-service", id="0", mkstream=True)
            pipe: Any = client.pipeline(transaction=False)
            for i in range(count):
                pipe.execute_command("XADD", "orders", "*", *flat_fields(order_message(i)))
            pipe.execute()
            env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERFLOW_")}
            env.update(
                ORDERFLOW_REDIS_URL=server.url,
                ORDERFLOW_SMTP_URL=f"smtp://127.0.0.1:{smtp_port}",
                ORDERFLOW_DATA_DIR=tmp,
                ORDERFLOW_SMTP_CONCURRENCY=mode,
            )
            args = ["email", "worker", "--concurrency", "32", "--metrics-port", str(metrics_port)]
            worker = subprocess.Popen(
                [ORDERFLOW, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            first: tuple[float, int] | None = None
            limits: list[int] = []
            deadline = time.monotonic() + 600
            while (sent := int(client.xlen("email-events"))) < count:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit(f"{mode}: only {sent} of {count} emails sent")
                if first is None and sent:
                    first = (time.monotonic(), sent)
                if first is not None and (limit := _limit(metrics_port)) is not None:
                    limits.append(limit)
                time.sleep(0.05)
            assert first is not None
            elapsed = time.monotonic() - first[0]
            return (count - first[1]) / elapsed, limits
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            sink.kill()
            sink.wait()
            client.close()
            server.stop()


def main() -> None:
    """Run the rounds and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="orders per run (5000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per mode (5)")
    parser.add_argument("--slow", action="store_true", help="the slow parsing server instead")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for n in range(args.rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            rate, limits = one_run(mode, args.count, args.slow)
            rates[mode].append(rate)
            seen = (
                f"limit: mean {statistics.mean(limits):.1f}, at the maximum "
                f"{sum(1 for x in limits if x == max(limits)) / len(limits):.0%} of the time"
                if limits
                else ""
            )
            print(f"round {n + 1} {mode:8} {rate:7.0f} emails/s  {seen}", flush=True)
    adaptive, fixed = (statistics.median(rates[mode]) for mode in MODES)
    sink = "aiosmtpd parsing each message" if args.slow else "smtp-sink"
    print(
        f"\n{sink}, {args.rounds} rounds of {args.count} orders, one worker (concurrency 32):"
        f"\nadaptive / fixed = {adaptive / fixed:.2f}  (medians: adaptive {adaptive:.0f}, "
        f"fixed {fixed:.0f} emails/s; load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
