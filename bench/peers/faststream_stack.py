"""The FastStream peer: the order → email flow written the way FastStream's docs teach.

``api``: a FastAPI app that starts a ``RedisBroker`` in its lifespan and publishes each
order from its route with ``broker.publish(order, stream=...)`` (FastStream's
"Integrations" page for FastAPI); the order is a pydantic model (``EmailStr`` for the
address), stored with sqlite3 first (WAL, ``synchronous=NORMAL``, one commit per order:
the same store as the minimal peer, so the two differ in the framework only). Served by
uvicorn with the options orderflow's API runs with (asyncio's loop, no access log).

``consumer``: a ``FastStream`` app whose ``@broker.subscriber`` reads the stream in a
consumer group (``StreamSub(..., group=..., consumer=...)``, FastStream's "Stream
Consumer Groups" page) and sends each order's confirmation with aiosmtplib, building an
``email.message.EmailMessage`` as aiosmtplib's documentation does. FastStream acks each
message after its handler returns (one XACK per message).

Choices, each the fairer one for the peer and stated in the report:

- ``max_workers`` = :data:`~bench.peers.CONCURRENCY` (FastStream's "Concurrency" page):
  as many emails in flight per process as orderflow's email worker has.
- a pool of that many open SMTP connections, not ``aiosmtplib.send()`` (a new
  connection per email, slower still).
- ``max_records`` = :data:`~bench.peers.READ_COUNT`: without it each XREADGROUP takes
  the whole backlog, and one consumer process starves the other.
- no per-message log lines (``logger=None``), as in case 2.

Run ``python -m bench.peers.faststream_stack api|consumer --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from email.message import EmailMessage
from email.utils import formatdate
from typing import Annotated, Any, cast

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, EmailStr, Field

from bench.peers import (
    CONCURRENCY,
    GROUP,
    MAIL_FROM,
    READ_COUNT,
    STREAM,
    SmtpPool,
    body_text,
    message_id,
    subject,
)


class Item(BaseModel):
    """One line of an order."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    quantity: Annotated[int, Field(ge=1)]
    price: Annotated[Decimal, Field(ge=0, decimal_places=2)]


class Order(BaseModel):
    """The body of ``POST /orders``, and the event's payload."""

    id: Annotated[int, Field(gt=0)]
    email: EmailStr
    total: Annotated[Decimal, Field(gt=0, decimal_places=2)]
    currency: Annotated[str, Field(pattern="^[A-Z]{3}$")]
    items: Annotated[list[Item], Field(min_length=1)]


def create_api(redis_url: str, db_path: str) -> FastAPI:
    """The FastAPI app: ``POST /orders`` publishes through a RedisBroker."""
    from faststream.redis import RedisBroker

    # No per-message log lines: FastStream at its fastest (the default logs each publish).
    broker = RedisBroker(redis_url, logger=cast(Any, None))
    db: dict[str, sqlite3.Connection] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connection = sqlite3.connect(db_path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, email TEXT NOT NULL, "
            "total TEXT NOT NULL, currency TEXT NOT NULL, body TEXT NOT NULL)"
        )
        db["orders"] = connection
        await broker.start()
        yield
        await broker.stop()
        connection.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def create_order(order: Order) -> dict[str, Any]:
        try:
            db["orders"].execute(
                "INSERT INTO orders (id, email, total, currency, body) VALUES (?, ?, ?, ?, ?)",
                (order.id, order.email, str(order.total), order.currency, order.model_dump_json()),
            )
        except sqlite3.IntegrityError:
            raise HTTPException(409, "order exists") from None
        await broker.publish(order, stream=STREAM)
        return {"id": order.id, "status": "accepted"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def confirmation(order: Order) -> EmailMessage:
    """The confirmation email, built with the standard library as aiosmtplib's docs do."""
    message = EmailMessage()
    message["From"] = MAIL_FROM
    message["To"] = order.email
    message["Subject"] = subject(order.id)
    message["Date"] = formatdate()
    message["Message-ID"] = message_id(order.id)
    items = [(item.name, item.quantity, str(item.price)) for item in order.items]
    message.set_content(body_text(order.id, str(order.total), order.currency, items))
    return message


def create_consumer(redis_url: str, smtp_port: int, name: str) -> Any:
    """The FastStream app of one consumer process (a ``FastStream``; untyped here)."""
    from faststream import FastStream
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(redis_url, logger=cast(Any, None))
    app = FastStream(broker, logger=cast(Any, None))
    pool = SmtpPool("127.0.0.1", smtp_port)
    app.on_startup(pool.open)
    app.after_shutdown(pool.close)

    async def send_confirmation(order: Order) -> None:
        async with pool.connection() as smtp:
            await smtp.send_message(confirmation(order))

    stream = StreamSub(STREAM, group=GROUP, consumer=name, max_records=READ_COUNT)
    # FastStream's decorator, called plainly: its types are not installed for mypy.
    subscriber: Any = broker.subscriber(stream=stream, max_workers=CONCURRENCY)
    subscriber(send_confirmation)
    return app


def main(argv: list[str] | None = None) -> int:
    """``api`` or ``consumer``, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.faststream_stack")
    commands = parser.add_subparsers(dest="command", required=True)
    api = commands.add_parser("api", help="the FastAPI app under uvicorn")
    api.add_argument("--port", type=int, required=True)
    api.add_argument("--redis-url", required=True)
    api.add_argument("--db", required=True, help="SQLite file")
    consumer = commands.add_parser("consumer", help="one FastStream consumer process")
    consumer.add_argument("--redis-url", required=True)
    consumer.add_argument("--smtp-port", type=int, required=True)
    consumer.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    if args.command == "api":
        uvicorn.run(
            create_api(args.redis_url, args.db),
            host="127.0.0.1",
            port=args.port,
            loop="asyncio",
            lifespan="on",
            access_log=False,
            log_level="warning",
        )
    else:
        app = create_consumer(args.redis_url, args.smtp_port, args.name)
        asyncio.run(app.run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
