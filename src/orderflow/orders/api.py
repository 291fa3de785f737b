"""The Order Service's HTTP API (FastAPI), built by ``create_app``; nothing runs at import.

This is the API alone; ``orderflow.app`` adds the web console to it.

``POST /orders`` validates strictly, then stores the order and its event in one
transaction and wakes the relay; ``GET /orders/{id}`` shows the confirmation status;
``GET /health`` and ``GET /metrics`` serve operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

import orjson
import redis.asyncio as aioredis
import sqlalchemy as sa
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from pydantic import ValidationError
from redis.exceptions import ResponseError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from orderflow import tracing
from orderflow.bus import connect, redact_url
from orderflow.bus.admin import OperationError, record_stream_metrics
from orderflow.bus.errors import TRANSIENT as TRANSIENT_REDIS_ERRORS
from orderflow.config import Settings, resolve_redis_url
from orderflow.domain import MAX_ORDER_ID
from orderflow.orders import metrics
from orderflow.orders.database import Database
from orderflow.orders.problems import PROBLEM_JSON, Problem, database_problem, invalid
from orderflow.orders.relay import RelayConfig
from orderflow.orders.request_body import Disconnected, check_media_type, read_body, receive_body
from orderflow.orders.runtime import OrderConflict, OrderRuntime
from orderflow.orders.validation import (
    BodyError,
    OrderRequest,
    OrderRequestV2,
    field_errors,
    parse_body,
    validate_idempotency_key,
    validate_order,
)

log = logging.getLogger(__name__)

#: Seconds a health check waits for Redis or the database.
HEALTH_TIMEOUT_S = 2.0


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(data), status_code=status, media_type="application/json", headers=headers
    )


async def _take_order(
    runtime: OrderRuntime, body: bytes, idempotency_key: str | None
) -> tuple[bytes, dict[str, str]]:
    """Validate and store one order (``POST /orders`` of either path): the 201's body
    and headers, or a Problem."""
    try:
        order_request = validate_order(parse_body(body))
        key = validate_idempotency_key(idempotency_key) if idempotency_key is not None else None
    except BodyError as exc:
        runtime.count_invalid()
        raise invalid([{"field": "body", "message": str(exc)}]) from None
    except ValidationError as exc:
        runtime.count_invalid()
        raise invalid(field_errors(exc)) from None
    except ValueError as exc:
        runtime.count_invalid()
        raise invalid([{"field": "Idempotency-Key", "message": str(exc)}]) from None
    try:
        result = await runtime.place_order(order_request, idempotency_key=key)
    except OrderConflict as exc:
        raise Problem(409, "Conflict", str(exc), kind="urn:orderflow:problem:conflict") from None
    headers = {"Location": f"/orders/{result.order.id}"}
    if not result.created:
        headers["Idempotent-Replayed"] = "true"
    return orjson.dumps(result.order.to_json()), headers


_HEADERS_READ = frozenset((b"content-type", b"idempotency-key", b"content-length"))


async def _post_orders(runtime: OrderRuntime, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /orders`` as a plain ASGI handler: the route's checks and answers, without
    FastAPI's per-request middleware, request object and dependency solving (which
    cost more CPU than taking the order)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        # The first of a repeated header counts, as with Starlette's Headers.get.
        if name in _HEADERS_READ and name not in found:
            found[name] = value.decode("latin-1")
    content_type = found.get(b"content-type")
    idempotency_key = found.get(b"idempotency-key")
    declared = found.get(b"content-length")
    headers: dict[str, str] = {}
    try:
        try:
            check_media_type(content_type)
            body = await receive_body(receive, declared)
        except Problem:
            runtime.count_invalid()
            raise
        payload, headers = await _take_order(runtime, body, idempotency_key)
        status, media_type = 201, b"application/json"
    except Disconnected:
        return
    except Problem as problem:
        status, media_type, payload = problem.status, PROBLEM_JSON.encode(), problem.body("/orders")
    except sa.exc.SQLAlchemyError as exc:
        unavailable = database_problem("POST", "/orders", exc)
        status, media_type = unavailable.status, PROBLEM_JSON.encode()
        payload = unavailable.body("/orders")
    raw_headers = [
        (b"content-length", str(len(payload)).encode()),
        (b"content-type", media_type),
    ]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class OrderServiceApp(FastAPI):
    """FastAPI, with ``POST /orders`` (the hot path) answered by :func:`_post_orders`.

    Everything else, the OpenAPI document of ``POST /orders`` included, is FastAPI's;
    the FastAPI route stays as the reference implementation (and serves when the app
    is mounted under a root path or before its lifespan started).
    """

    #: With tracing on: the app behind OpenTelemetry's ASGI middleware (set by create_app),
    #: so the lean path gets its SERVER span too.
    traced: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route ``POST /orders`` to the lean path, the rest to FastAPI."""
        if self.traced is not None:
            await self.traced(scope, receive, send)
        else:
            await self.route(scope, receive, send)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /orders`` to :func:`_post_orders`, the rest to FastAPI."""
        if (
            scope["type"] == "http"
            and scope["path"] == "/orders"
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            runtime: OrderRuntime | None = getattr(self.state, "orders", None)
            if runtime is not None:
                await _post_orders(runtime, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _order_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """The body schema of ``POST /orders`` (today's shape or version 2's) and the
    component schemas it refers to."""
    components: dict[str, Any] = {}
    variants = []
    for model in (OrderRequest, OrderRequestV2):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        variants.append({"$ref": f"#/components/schemas/{model.__name__}"})
    return {"oneOf": variants}, components


def _with_body_components(app: FastAPI, components: dict[str, Any]) -> None:
    """Add the body's component schemas to the app's OpenAPI document (FastAPI knows
    nothing of a body given as ``openapi_extra``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings,
    *,
    redis: aioredis.Redis | None = None,
    database: Database | None = None,
    run_relay: bool = True,
    run_email_status: bool = True,
    run_reconciler: bool = True,
    relay_config: RelayConfig | None = None,
) -> FastAPI:
    """The Order Service's API. Its lifespan migrates the database and, unless told
    not to, runs the outbox relay, the email-status consumer and the reconciler
    (``app.state.orders``: the OrderRuntime).

    ``redis`` and ``database`` given by the caller are used and left open.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = database or Database(settings.database_url_value)
        client = redis
        try:
            await db.run(db.migrate)
            if client is None:
                url = resolve_redis_url(settings)
                # A socket timeout, so a hung Redis fails a publish instead of freezing it.
                client = connect(url, socket_timeout=10)
                log.info("order service using Redis at %s", redact_url(url))
            runtime = OrderRuntime.start(
                settings,
                db,
                client,
                run_relay=run_relay,
                run_email_status=run_email_status,
                run_reconciler=run_reconciler,
                relay_config=relay_config,
            )
            app.state.orders = runtime
            try:
                yield
            finally:
                await runtime.stop()
        finally:
            if redis is None and client is not None:
                await client.aclose()
            if database is None:
                db.close()

    app = OrderServiceApp(
        title="orderflow Order Service",
        version="1",
        lifespan=lifespan,
        description="Takes orders; their events reach Redis through a transactional outbox.",
    )
    _routes(app)
    if tracing.enabled:
        app.traced = tracing.asgi(app.route)
    return app


def _runtime(request: Request) -> OrderRuntime:
    runtime: OrderRuntime = request.app.state.orders
    return runtime


def _routes(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            if loc and loc[0] in ("path", "query", "header", "body"):
                loc = loc[1:] or loc
            errors.append({"field": ".".join(loc) or "request", "message": str(err.get("msg"))})
        return invalid(errors).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        title = str(exc.detail)
        return Problem(exc.status_code, title, title).response(request.url.path)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _database(request: Request, exc: sa.exc.SQLAlchemyError) -> Response:
        problem = database_problem(request.method, request.url.path, exc)
        return problem.response(request.url.path)

    body_schema, body_components = _order_schemas()
    _with_body_components(app, body_components)

    @app.post(
        "/orders",
        status_code=201,
        summary="Create an order (idempotent by Idempotency-Key or client id)",
        responses={
            201: {"description": "The order (also on a replay of the same request)"},
            409: {"description": "The id or key belongs to a different request"},
            422: {"description": "Invalid input", "content": {PROBLEM_JSON: {}}},
        },
        openapi_extra={
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "Retries with the same key return the same order.",
                    "schema": {"type": "string", "maxLength": 255},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            },
        },
    )
    async def create_order(request: Request) -> Response:
        """Store the order and its ``order.created`` event in one transaction."""
        # Served by _post_orders once the app runs (see OrderServiceApp); the same
        # steps, kept here for the OpenAPI document and as the reference.
        try:
            check_media_type(request.headers.get("content-type"))
            body = await read_body(request)
        except Problem:
            OrderRuntime.count_invalid()
            raise
        payload, headers = await _take_order(
            _runtime(request), body, request.headers.get("idempotency-key")
        )
        return Response(payload, 201, headers=headers, media_type="application/json")

    @app.get("/orders/{order_id}", summary="An order and its confirmation email status")
    async def get_order(
        request: Request, order_id: Annotated[int, Path(ge=1, le=MAX_ORDER_ID)]
    ) -> Response:
        """The order, with ``email_status`` (pending, sent, failed) and its time."""
        runtime = _runtime(request)
        order = await runtime.db.run(runtime.store.get, order_id)
        if order is None:
            raise Problem(404, "Not found", f"no order {order_id}")
        return _json(order.to_json())

    @app.get("/health", summary="Redis and the database reachable")
    async def health(request: Request) -> Response:
        """200 when Redis and the database answer, else 503 naming what is down."""
        runtime = _runtime(request)
        redis_check, db_check = await asyncio.gather(
            _check(runtime.redis.ping()), _check(runtime.db.run(runtime.db.ping))
        )
        healthy = redis_check == "ok" and db_check == "ok"
        body = {
            "status": "ok" if healthy else "unavailable",
            "redis": redis_check,
            "database": db_check,
            "relay": "running" if runtime.relay_running else "off",
        }
        return _json(body, 200 if healthy else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus(request: Request) -> Response:
        """Orders, the outbox backlog and the bus's metrics, in Prometheus text format."""
        runtime = _runtime(request)
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            metrics.OUTBOX_BACKLOG.set(await runtime.db.run(runtime.store.backlog))
        # Group lag and dead letters are Redis's figures, read at scrape time.
        with contextlib.suppress(*TRANSIENT_REDIS_ERRORS, OperationError, ResponseError):
            await record_stream_metrics(
                runtime.redis, [runtime.settings.stream, runtime.settings.email_events_stream]
            )
        return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)


def _registry() -> Any:
    """The metrics to serve: this process's, or with ``orders serve --workers N``
    (``PROMETHEUS_MULTIPROC_DIR`` set) every worker's, combined."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


async def _check(call: Awaitable[Any]) -> str:
    try:
        await asyncio.wait_for(call, HEALTH_TIMEOUT_S)
    except TimeoutError:
        return "down: no answer in time"
    except Exception as exc:
        return f"down: {type(exc).__name__}"
    return "ok"
