"""``orderflow demo``: the lab's story told through the real system, then its challenge.

1. Orders 101 (alice) and 102 (bob) are created through the API, published through the
   outbox and emailed by the Email Service, as in the lab.
2. The Email Service goes down. One order goes out over Pub/Sub (the lab's mode) and one
   over Streams. The service comes back: the Pub/Sub order is lost, the Streams order is
   delivered. Exit 0 only if every outcome is the one it must be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orderflow.bus import Message, PubSubPublisher, PubSubSubscriber, connect
from orderflow.cli.common import UsageError
from orderflow.cli.up import Stack, start_stack
from orderflow.config import Settings
from orderflow.embedded.redis_server import free_port
from orderflow.maildir import read_maildir


def register(commands: Any) -> None:
    """Add ``demo``."""
    parser = commands.add_parser("demo", help="the lab's scenario end to end, then its challenge")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each outcome (60)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.set_defaults(handler=demo_command)


class Outcome:
    """What happened to each order, checked against what must happen."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool]] = []

    def check(self, what: str, expected: str, got: str) -> bool:
        ok = expected == got
        self.rows.append((what, expected, got, ok))
        print(f"   {'✔' if ok else '✘'} {what}: {got}" + ("" if ok else f" (expected {expected})"))
        return ok

    @property
    def ok(self) -> bool:
        return all(row[3] for row in self.rows)


def _http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 - our own loopback API
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def _create_order(stack: Stack, order_id: int, email: str) -> None:
    status, body = await asyncio.to_thread(
        _http, "POST", f"{stack.api_url}/orders", {"id": order_id, "email": email, "total": "100"}
    )
    if status != 201:
        raise RuntimeError(f"POST /orders for #{order_id} answered {status}: {body}")
    print(f"💾 Order #{order_id} for {email} saved; its event is in the outbox")


def _emails_to(stack: Stack, order_id: int) -> int:
    marker = f"Order #{order_id} "
    return sum(1 for m in read_maildir(stack.mail_dir) if marker in str(m["Subject"]) + " ")


async def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _group_lag(redis: Any, stream: str, group: str) -> int:
    for info in await redis.xinfo_groups(stream):
        if info["name"] in (group, group.encode()):
            return int(info.get("lag") or 0) + int(info["pending"])
    return 0


async def _wait_async(probe: Callable[[], Awaitable[int]], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def _email_status(stack: Stack, order_id: int) -> str:
    status, body = _http("GET", f"{stack.api_url}/orders/{order_id}")
    return str(body.get("email_status")) if status == 200 else f"HTTP {status}"


async def the_lab(stack: Stack, outcome: Outcome, timeout: float) -> None:
    """Part 1: orders 101 and 102, each ending as exactly one email."""
    print("\n── Part 1: the lab, on Redis Streams ──")
    await _create_order(stack, 101, "alice@example.com")
    await _create_order(stack, 102, "bob@example.com")
    for order_id in (101, 102):
        await _wait(lambda o=order_id: _emails_to(stack, o) >= 1, timeout)  # type: ignore[misc]
        await _wait(lambda o=order_id: _email_status(stack, o) == "sent", timeout)  # type: ignore[misc]
        outcome.check(f"order #{order_id} emails", "1", str(_emails_to(stack, order_id)))
        outcome.check(f"order #{order_id} status", "sent", _email_status(stack, order_id))


async def the_challenge(stack: Stack, outcome: Outcome, timeout: float) -> None:
    """Part 2: the Email Service is down; one order over Pub/Sub, one over Streams."""
    print("\n── Part 2: the challenge — the Email Service is down ──")
    await stack.supervisor.pause("email-worker")
    print("🛑 Email Service stopped")
    redis = connect(stack.redis_url)
    try:
        order = {"id": 103, "email": "carol@example.com", "total": "100.00"}
        receivers = await PubSubPublisher(redis).publish(
            stack.settings.channel, Message(data=order)
        )
        print(f"📢 Order #103 published over Pub/Sub: {receivers} subscriber(s) heard it")
        await _create_order(stack, 104, "dave@example.com")
        stream, group = stack.settings.stream, stack.settings.group
        waiting = await _wait_async(lambda: _group_lag(redis, stream, group), timeout)
        print(
            f"📦 Order #104 published over Streams: it waits in stream '{stream}' "
            f"(group '{group}' lag {waiting}) until the Email Service is back"
        )

        heard: list[int] = []

        async def listen(message: Message) -> None:
            heard.append(int(message.data.get("id", 0)))

        # The Pub/Sub Email Service comes back too: does it get order #103?
        subscriber = PubSubSubscriber(redis, stack.settings.channel, listen)
        task = asyncio.create_task(subscriber.run())
        await subscriber.wait_subscribed()
        await stack.supervisor.resume("email-worker")
        print("▶️  Email Service back")
        delivered = await _wait(lambda: _emails_to(stack, 104) >= 1, timeout)
        subscriber.stop()
        await task
    finally:
        await redis.aclose()
    pubsub_result = "lost" if 103 not in heard and _emails_to(stack, 103) == 0 else "delivered"
    streams_result = "delivered" if delivered and _emails_to(stack, 104) == 1 else "lost"
    print()
    print("   transport  order  subscriber down when published  result")
    print(f"   Pub/Sub    #103   yes                             {pubsub_result}")
    print(f"   Streams    #104   yes                             {streams_result}")
    outcome.check("Pub/Sub order #103 (fire and forget)", "lost", pubsub_result)
    outcome.check("Streams order #104 (persisted, consumer group)", "delivered", streams_result)


async def demo_command(args: argparse.Namespace) -> int:
    """Run the demo in a temporary data dir; exit 0 only if every outcome is right."""
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    data_dir = Path(tempfile.mkdtemp(prefix="orderflow-demo-"))
    # Self-contained: embedded Redis, SQLite and mail sink, whatever the environment says.
    settings = Settings(data_dir=data_dir, redis_url=None, database_url=None, smtp_url=None)
    print(f"orderflow demo in {data_dir}")
    stack = await start_stack(settings, port=free_port(), host="127.0.0.1", workers=1)
    print(f"   API {stack.api_url} · Redis {stack.redis_url} · Maildir {stack.mail_dir}")
    outcome = Outcome()
    try:
        await the_lab(stack, outcome, args.timeout)
        await the_challenge(stack, outcome, args.timeout)
    finally:
        await stack.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(data_dir, ignore_errors=True)
    print()
    if outcome.ok:
        print("✅ every outcome is the one it must be: Streams kept what Pub/Sub lost")
        return 0
    print("❌ some outcomes were wrong (see ✘ above)")
    return 1
