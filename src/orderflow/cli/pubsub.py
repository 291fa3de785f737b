"""``orderflow pubsub publish|subscribe``: the lab's publisher and subscriber."""

from __future__ import annotations

import argparse
import asyncio
import random
from typing import Any

from orderflow.bus import Message, PubSubPublisher, PubSubSubscriber
from orderflow.cli.common import (
    load_settings,
    parse_email,
    parse_order_id,
    parse_total,
    redis_client,
    stop_on_signals,
)


def register(commands: Any) -> None:
    """Add ``pubsub`` and its subcommands."""
    parser = commands.add_parser("pubsub", help="the lab's Pub/Sub mode (fire and forget)")
    sub = parser.add_subparsers(dest="pubsub_command", metavar="ACTION", required=True)

    publish = sub.add_parser("publish", help="publish one order on the channel")
    publish.add_argument("--email", required=True)
    publish.add_argument("--total", required=True)
    publish.add_argument("--id", dest="order_id")
    publish.add_argument("--channel", help="channel (default: ORDERFLOW_CHANNEL or orders)")
    publish.set_defaults(handler=publish_command)

    subscribe = sub.add_parser("subscribe", help="print one line per order received")
    subscribe.add_argument("--channel", help="channel (default: ORDERFLOW_CHANNEL or orders)")
    subscribe.add_argument("--count", type=int, help="exit after this many orders")
    subscribe.set_defaults(handler=subscribe_command)


async def publish_command(args: argparse.Namespace) -> int:
    """Publish ``{"id", "email", "total"}`` as the lab's publisher does."""
    email = parse_email(args.email)
    total = parse_total(args.total)
    order_id = parse_order_id(args.order_id) if args.order_id else random.randint(1000, 10**9)
    settings = load_settings()
    channel = args.channel or settings.channel
    order = {"id": order_id, "email": email, "total": total}
    async with redis_client(settings) as client:
        receivers = await PubSubPublisher(client).publish(channel, Message(data=order))
    print(f"📢 Order #{order_id} for {email} published to '{channel}' ", end="")
    print(f"({receivers} subscriber{'s' if receivers != 1 else ''} received it)")
    return 0


def describe(data: dict[str, Any] | Any) -> str:
    """The lab subscriber's line for one order."""
    return f"✅ Received Event: Order #{data.get('id', '?')} for {data.get('email', '?')}"


async def subscribe_command(args: argparse.Namespace) -> int:
    """Print one line per order until interrupted (or ``--count`` orders)."""
    settings = load_settings()
    channel = args.channel or settings.channel
    stop = asyncio.Event()
    seen = 0

    async def show(message: Message) -> None:
        nonlocal seen
        print(describe(dict(message.data)), flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            stop.set()

    async with redis_client(settings) as client:
        subscriber = PubSubSubscriber(client, channel, show)
        task = asyncio.create_task(subscriber.run())
        await subscriber.wait_subscribed()
        print(f"📧 listening on '{channel}'…", flush=True)
        stop_on_signals(stop)
        await stop.wait()
        subscriber.stop()
        await task
    return 0
