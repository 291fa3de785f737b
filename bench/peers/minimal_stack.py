"""The minimal peer: the cheapest correct code for order → stream → email.

``api``: one raw ASGI callable under uvicorn (with the options orderflow's API runs
with). ``POST /orders`` parses and checks the body, inserts the order with sqlite3
(WAL, ``synchronous=NORMAL``, one commit per order, as orderflow's SQLite is set up),
then appends its event: concurrent requests' XADDs go out in one pipeline, and each
request answers 201 once its own entry is in.

``consumer``: a loop that reads up to :data:`~bench.peers.READ_COUNT` entries with one
XREADGROUP, sends their emails concurrently over a pool of
:data:`~bench.peers.CONCURRENCY` aiosmtplib connections, and acks every sent one with
one XACK. An email that fails stays pending; the consumer reads its own pending entries
first when it starts. No outbox, no ledger (see :mod:`bench.peers`).

Run ``python -m bench.peers.minimal_stack api|consumer --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from email.utils import formatdate
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvicorn
from redis.exceptions import ResponseError

from bench.peers import (
    ADDRESS,
    CONCURRENCY,
    GROUP,
    MAIL_FROM,
    MAX_ADDRESS,
    READ_COUNT,
    STREAM,
    SmtpPool,
    body_text,
    message_id,
    subject,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Largest accepted body, as orderflow's.
MAX_BODY = 64 * 1024


class InvalidOrder(ValueError):
    """A body that is not an order; the message names the field."""


def parse_order(body: bytes) -> dict[str, Any]:
    """The order in ``body``, checked: what the consumer puts in headers is safe there."""
    try:
        order = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidOrder("body: not JSON") from None
    if not isinstance(order, dict):
        raise InvalidOrder("body: not a JSON object")
    order_id = order.get("id")
    if type(order_id) is not int or not 0 < order_id < 2**63:
        raise InvalidOrder("id: must be a positive integer")
    email = order.get("email")
    if not isinstance(email, str) or len(email) > MAX_ADDRESS or not ADDRESS.fullmatch(email):
        raise InvalidOrder("email: not a plain address")
    currency = order.get("currency")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise InvalidOrder("currency: must be three letters")
    _amount("total", order.get("total"))
    items = order.get("items")
    if not isinstance(items, list) or not items:
        raise InvalidOrder("items: must be a non-empty list")
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidOrder("items: each needs a name")
        if type(item.get("quantity")) is not int or item["quantity"] < 1:
            raise InvalidOrder("items: quantity must be a positive integer")
        _amount("items: price", item.get("price"))
    return order


def _amount(field: str, value: object) -> None:
    try:
        amount = Decimal(value) if isinstance(value, str) else None
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite() or amount < 0:
        raise InvalidOrder(f'{field}: must be a decimal string like "12.50"')


class XaddPipeline:
    """XADDs of concurrent requests sent together: one pipeline per round trip."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self.flushing: asyncio.Task[None] | None = None

    async def xadd(self, data: bytes) -> None:
        """Append ``data`` (the order's JSON) to the stream; returns once it is in."""
        done = asyncio.get_running_loop().create_future()
        self.pending.append((data, done))
        if self.flushing is None:
            self.flushing = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for data, _ in batch:
                            pipe.xadd(STREAM, {"data": data})
                        await pipe.execute()
                except Exception as exc:  # every waiting request answers with it
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self.flushing = None


class MinimalApi:
    """The ASGI app: ``POST /orders`` and ``GET /health``."""

    def __init__(self, redis_url: str, db_path: str) -> None:
        self.redis_url = redis_url
        self.db_path = db_path
        self.db: sqlite3.Connection | None = None
        self.client: aioredis.Redis | None = None
        self.xadds: XaddPipeline | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] == "/orders":
                await self._post_order(receive, send)
            elif scope["method"] == "GET" and scope["path"] == "/health":
                await _answer(send, 200, b'{"status":"ok"}')
            else:
                await _answer(send, 404, b'{"detail":"not found"}')

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _open(self) -> None:
        self.db = sqlite3.connect(self.db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, email TEXT NOT NULL, "
            "total TEXT NOT NULL, currency TEXT NOT NULL, body BLOB NOT NULL)"
        )
        self.client = aioredis.Redis.from_url(self.redis_url)
        self.xadds = XaddPipeline(self.client)

    async def _close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.db is not None:
            self.db.close()

    async def _post_order(self, receive: Receive, send: Send) -> None:
        assert self.db is not None
        assert self.xadds is not None
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _answer(send, 413, b'{"detail":"body too large"}')
                return
            if not message.get("more_body"):
                break
        try:
            order = parse_order(body)
        except InvalidOrder as exc:
            await _answer(send, 422, orjson.dumps({"detail": str(exc)}))
            return
        try:
            # Autocommit: the INSERT is its own transaction, committed when it returns.
            self.db.execute(
                "INSERT INTO orders (id, email, total, currency, body) VALUES (?, ?, ?, ?, ?)",
                (order["id"], order["email"], order["total"], order["currency"], body),
            )
        except sqlite3.IntegrityError:
            await _answer(send, 409, b'{"detail":"order exists"}')
            return
        try:
            await self.xadds.xadd(body)
        except Exception:
            # No outbox: the order is stored, its event perhaps not (the pipeline failed,
            # maybe after this entry). Say so.
            await _answer(send, 503, b'{"detail":"stored; its event may not be published"}')
            return
        await _answer(send, 201, orjson.dumps({"id": order["id"], "status": "accepted"}))


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def render(order: dict[str, Any]) -> bytes:
    """The confirmation email, as wire bytes (every value was checked by the API)."""
    order_id = order["id"]
    items = [(i["name"], i["quantity"], i["price"]) for i in order["items"]]
    text = body_text(order_id, order["total"], order["currency"], items)
    head = (
        f"From: {MAIL_FROM}\r\nTo: {order['email']}\r\nSubject: {subject(order_id)}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: {message_id(order_id)}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return (head + text.replace("\n", "\r\n")).encode()


async def consume(redis_url: str, smtp_host: str, smtp_port: int, name: str) -> None:
    """Email every order of the stream until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = aioredis.Redis.from_url(redis_url)
    pool = SmtpPool(smtp_host, smtp_port, CONCURRENCY)
    try:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: another consumer made it
            await client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        await pool.open()
        # Own pending entries first (a previous run's unsent ones), then new ones.
        last = "0"
        while not stop.is_set():
            block = None if last == "0" else 500
            reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
            reply = await client.xreadgroup(  # type: ignore[assignment]
                GROUP, name, {STREAM: last}, count=READ_COUNT, block=block
            )
            entries = reply[0][1] if reply else []
            if last == "0" and not entries:
                last = ">"
                continue
            if not entries:
                continue
            orders = [orjson.loads(fields[b"data"]) for _, fields in entries]
            sent = await asyncio.gather(
                *(_send(pool, order["email"], render(order)) for order in orders),
                return_exceptions=True,
            )
            acked = [
                entry_id
                for (entry_id, _), result in zip(entries, sent, strict=True)
                if not isinstance(result, BaseException)
            ]
            if acked:
                await client.xack(STREAM, GROUP, *acked)
    finally:
        await pool.close()
        await client.aclose()


async def _send(pool: SmtpPool, recipient: str, data: bytes) -> None:
    async with pool.connection() as smtp:
        await smtp.sendmail(MAIL_FROM, [recipient], data)


def main(argv: list[str] | None = None) -> int:
    """``api`` or ``consumer``, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.minimal_stack")
    commands = parser.add_subparsers(dest="command", required=True)
    api = commands.add_parser("api", help="the ASGI app under uvicorn")
    api.add_argument("--port", type=int, required=True)
    api.add_argument("--redis-url", required=True)
    api.add_argument("--db", required=True, help="SQLite file")
    consumer = commands.add_parser("consumer", help="one email consumer process")
    consumer.add_argument("--redis-url", required=True)
    consumer.add_argument("--smtp-port", type=int, required=True)
    consumer.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    if args.command == "api":
        # orderflow's API options (orderflow.cli.orders): asyncio's loop, no access log.
        uvicorn.run(
            MinimalApi(args.redis_url, args.db),
            host="127.0.0.1",
            port=args.port,
            loop="asyncio",
            lifespan="on",
            access_log=False,
            log_level="warning",
        )
    else:
        asyncio.run(consume(args.redis_url, "127.0.0.1", args.smtp_port, args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
