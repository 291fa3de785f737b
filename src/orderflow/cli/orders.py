"""``orderflow orders serve|create`` and ``orderflow relay``: the Order Service's commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from orderflow.cli.common import CommandError, UsageError, load_settings, stop_on_signals
from orderflow.config import ConfigError, Settings, resolve_redis_url

if TYPE_CHECKING:
    # Imported where used: the Order Service (SQLAlchemy, alembic, FastAPI) loads only
    # for the commands that need it.
    import uvicorn

    from orderflow.orders import OrderStore, RelayConfig

log = logging.getLogger(__name__)


def _quiet_alembic() -> None:
    # Before orderflow.orders is imported: importing alembic logs its plugins at INFO.
    logger = logging.getLogger("alembic")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def register(commands: Any) -> None:
    """Add ``orders`` (serve, create) and the top-level ``relay``."""
    parser = commands.add_parser("orders", help="the Order Service: HTTP API and orders")
    sub = parser.add_subparsers(dest="orders_command", metavar="ACTION", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (and the outbox relay)")
    serve.add_argument("--port", type=int, help="port (default: ORDERFLOW_API_PORT or 8000)")
    serve.add_argument("--host", help="address (default: ORDERFLOW_API_HOST or 127.0.0.1)")
    serve.add_argument(
        "--no-relay",
        action="store_true",
        help="do not publish the outbox here (run `orderflow relay` instead)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes sharing the port, for more throughput (default: 1)",
    )
    serve.set_defaults(handler=serve_command)

    create = sub.add_parser("create", help="create one order and publish its event")
    create.add_argument("--email", required=True)
    create.add_argument("--total", required=True, help="amount, e.g. 100 or 19.99")
    create.add_argument("--id", dest="order_id", help="order id (default: assigned)")
    create.add_argument("--currency", default="USD", help="ISO 4217 code (default: USD)")
    create.set_defaults(handler=create_command)

    relay = commands.add_parser("relay", help="run the outbox relay alone")
    relay.add_argument(
        "--batch-size", type=int, default=500, help="events per round trip (default: 500)"
    )
    relay.set_defaults(handler=relay_command)


def _relay_config(settings: Settings, batch_size: int | None = None) -> RelayConfig:
    from orderflow.orders.relay import DEFAULT_BATCH_SIZE, RelayConfig

    size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    try:
        return RelayConfig.from_settings(settings, batch_size=size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def _database_errors(settings: Settings) -> Iterator[None]:
    import sqlalchemy as sa

    from orderflow.orders.database import redact_db_url

    try:
        yield
    except ValueError as exc:
        raise UsageError(f"ORDERFLOW_DATABASE_URL: {exc}") from None
    except sa.exc.SQLAlchemyError as exc:
        url = redact_db_url(settings.database_url_value)
        raise CommandError(f"database {url} failed: {type(exc).__name__}: {exc}") from None


async def serve_command(args: argparse.Namespace) -> int:
    """Run the API with uvicorn until SIGINT or SIGTERM, then stop cleanly."""
    _quiet_alembic()
    import uvicorn

    from orderflow.app import create_app

    settings = load_settings()
    port = settings.api_port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {port}")
    host = args.host or settings.api_host
    # The app decides what to serve by where it is bound (the console needs an admin
    # token beyond loopback), so the flag must reach its settings, and its workers'.
    settings = settings.model_copy(update={"api_host": host})
    os.environ["ORDERFLOW_API_HOST"] = host
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    resolve_redis_url(settings)  # fail now, with the fix in the message, not in the lifespan
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": logging.getLevelName(logging.getLogger().level).lower(),
        "lifespan": "on",
        "access_log": False,
        # asyncio's loop, as every other command (see orderflow.cli.run: not uvloop).
        "loop": "asyncio",
    }
    if args.workers > 1:
        # uvicorn's supervisor: each worker process builds the app from the environment
        # and runs its own relay, email-status consumer and reconciler; they share the
        # work through the database (lease or SKIP LOCKED) and the consumer group.
        # It handles SIGINT/SIGTERM itself, stopping the workers gracefully.
        factory = "app_from_environment" if not args.no_relay else "app_without_relay"
        # One /metrics for all of them: each worker writes its metrics to files in this
        # directory (Prometheus multiprocess mode) and whichever answers serves the sum.
        metrics_dir = _fresh_dir(settings.data_dir / f"metrics-{os.getpid()}")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        try:
            uvicorn.run(f"orderflow.app:{factory}", factory=True, workers=args.workers, **options)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    config = uvicorn.Config(create_app(settings, run_relay=not args.no_relay), **options)
    server = _server(config)
    stop = asyncio.Event()
    stop_on_signals(stop)

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_asked())
    try:
        await server.serve()
    finally:
        watcher.cancel()
    if not server.started:
        raise CommandError(f"the Order Service did not start on {host}:{port} (see the log)")
    return 0


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """A uvicorn server that leaves SIGINT/SIGTERM to the command, which stops it."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn would re-raise the signal after shutting down; exit 0 instead.
            yield

    return Server(config)


async def create_command(args: argparse.Namespace) -> int:
    """Store one order with its event, try to publish at once, print the order as JSON."""
    _quiet_alembic()
    from pydantic import ValidationError

    from orderflow.orders import Database, OrderConflict, OrderStore
    from orderflow.orders.validation import field_errors, validate_order

    body: dict[str, Any] = {
        "email": args.email,
        "total": args.total,
        "currency": args.currency,
    }
    if args.order_id is not None:
        try:
            body["id"] = int(args.order_id)
        except ValueError:
            raise UsageError(f"--id {args.order_id!r} is not an integer") from None
    try:
        request = validate_order(body)
    except ValidationError as exc:
        first = field_errors(exc)[0]
        raise UsageError(f"--{first['field']} {first['message']}") from None
    settings = load_settings()
    with _database_errors(settings):
        db = Database(settings.database_url_value)
    try:
        with _database_errors(settings):
            await db.run(db.migrate)
            store = OrderStore(
                db, stream=settings.stream, event_version=settings.order_event_version
            )
            try:
                result = await db.run(store.create, request)
            except OrderConflict as exc:
                raise CommandError(str(exc)) from None
        if result.created:
            await _publish_now(settings, store)
        order = await db.run(store.get, result.order.id)
    finally:
        db.close()
    assert order is not None
    sys.stdout.write(orjson.dumps(order.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


async def _publish_now(settings: Settings, store: OrderStore) -> None:
    """One relay pass; the order is safe in the outbox whatever happens here."""
    from orderflow.bus import Retention, connect, redact_url
    from orderflow.bus.errors import TRANSIENT as TRANSIENT_REDIS_ERRORS
    from orderflow.orders import OutboxRelay

    try:
        url = resolve_redis_url(settings)
    except ConfigError as exc:
        print(f"orderflow: order stored; not published yet: {exc}", file=sys.stderr)
        return
    client = connect(url, socket_timeout=5)
    relay = OutboxRelay(
        store,
        client,
        config=_relay_config(settings),
        retention=Retention(maxlen=settings.stream_maxlen),
        partitions=settings.partitions,
    )
    try:
        published = await relay.publish_pending()
        if not published and not relay.is_leader:
            print(
                "orderflow: order stored; the running relay publishes it",
                file=sys.stderr,
            )
    except TRANSIENT_REDIS_ERRORS as exc:
        print(
            f"orderflow: order stored; Redis at {redact_url(url)} unreachable ({exc}): "
            "`orderflow relay` publishes it later",
            file=sys.stderr,
        )
    finally:
        await relay.close()
        await client.aclose()


async def relay_command(args: argparse.Namespace) -> int:
    """Publish the outbox until SIGINT or SIGTERM."""
    _quiet_alembic()
    from orderflow.bus import Retention, connect, redact_url
    from orderflow.orders import Database, OrderStore, OutboxRelay

    settings = load_settings()
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = _relay_config(settings, args.batch_size)
    url = resolve_redis_url(settings)
    with _database_errors(settings):
        db = Database(settings.database_url_value)
    client = connect(url, socket_timeout=10)
    try:
        with _database_errors(settings):
            await db.run(db.migrate)
        relay = OutboxRelay(
            OrderStore(db, stream=settings.stream, event_version=settings.order_event_version),
            client,
            config=config,
            retention=Retention(maxlen=settings.stream_maxlen),
            partitions=settings.partitions,
        )
        stop = asyncio.Event()
        stop_on_signals(stop)
        task = asyncio.create_task(relay.run())
        log.info("relay %s publishing the outbox to %s", relay.name, redact_url(url))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        relay.stop()
        stopped.cancel()
        await task
        log.info("relay stopped after publishing %d events", relay.stats.published)
    finally:
        await client.aclose()
        db.close()
    return 0
