"""The console's routes: Orders, Flow, Dead letters, Inbox and Events pages, actions,
live events.

Pages are rendered on the server by Jinja2 with autoescaping on for every template,
so anything a user typed (an email, an item name, a dead letter's payload, a mail
header) is shown as text. Every response carries the security headers of
``security.secure_headers``; every request passes ``ConsoleGuard`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from jinja2 import Environment, PackageLoader
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from orderflow.bus.admin import (
    BATCH_SIZE,
    OperationError,
    dead_letter_stream,
    last_dead_letter_id,
    list_dead_letters,
    parse_entry_id,
    purge_all_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    stream_info,
)
from orderflow.config import Settings
from orderflow.console import security
from orderflow.console.events import catalogue, code_spans, in_flight
from orderflow.console.forms import FormError, OrderForm, read_form, validate_order_form
from orderflow.console.inbox import find_by_message_id, list_inbox, read_message, valid_key
from orderflow.console.journey import load_journey, order_id_of
from orderflow.console.live import RECENT_ORDERS, LiveFeed, LiveOptions
from orderflow.console.security import ConsoleGuard, Refusal
from orderflow.formatting import human_duration, human_size
from orderflow.orders.runtime import OrderConflict, OrderRuntime

log = logging.getLogger(__name__)

#: Dead letters listed per stream on the page.
DEAD_LETTERS_SHOWN = 50
_STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_ACTIONS = ("replay", "purge", "replay-all", "purge-all")
_NOTICES = {
    "replayed": "Replayed {n} dead letter(s) to their stream.",
    "purged": "Purged {n} dead letter(s).",
    "none": "Select at least one dead letter first.",
}


def _duration(ms: Any) -> str:
    """Milliseconds as a short human duration (``850ms``, ``4.2s``), ``—`` when unknown."""
    return "—" if ms is None else human_duration(float(ms))


def _bytes(size: Any) -> str:
    """Bytes in binary units (``1.5 KiB``), ``—`` when unknown."""
    return "—" if size is None else human_size(float(size))


def _time(value: Any) -> str:
    if value is None:
        return "—"
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _time_ms(value: datetime | None) -> str:
    """A time to the millisecond (the journey's steps are often milliseconds apart)."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _items(items: Any) -> str:
    return ", ".join(f"{item.get('quantity', 1)} × {item.get('name', '')}" for item in items or [])


def _pretty(text: str) -> str:
    """JSON pretty-printed when it parses, else the text as it is."""
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return text


def _environment() -> Environment:
    # autoescape=True for every template whatever its name: nothing is ever unescaped.
    env = Environment(
        loader=PackageLoader("orderflow.console", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=_duration, size=_bytes, when=_time, items=_items, pretty=_pretty)
    env.filters["urlpart"] = lambda value: quote(str(value), safe="")
    env.filters["code_spans"] = code_spans
    env.filters["order_id"] = order_id_of
    env.filters["when_ms"] = _time_ms
    return env


def _runtime(request: Request) -> OrderRuntime:
    runtime: OrderRuntime = request.app.state.orders
    return runtime


def console_router(settings: Settings, *, options: LiveOptions | None = None) -> APIRouter:
    """The console for the Order Service app: include it with ``app.include_router``.

    Its lifespan runs the live ticker next to the service's own background tasks.
    """
    guard = ConsoleGuard(settings)
    feed = LiveFeed(settings, options)
    env = _environment()
    events_catalogue = catalogue(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        refused = guard.configuration_refusal()
        if refused is not None:
            log.warning("%s. %s", refused.title, refused.detail)
        app.state.console = feed
        task = asyncio.create_task(feed.run(_runtime_of(app)), name="orderflow-console-ticker")
        try:
            yield
        finally:
            feed.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    router = APIRouter(lifespan=lifespan, include_in_schema=False)

    def render(request: Request, template: str, *, status: int = 200, **context: Any) -> Response:
        token, new = security.csrf_token(request)
        html = env.get_template(template).render(
            csrf_field=security.CSRF_FIELD,
            csrf=token,
            login_enabled=guard.token_required,
            **context,
        )
        response = HTMLResponse(html, status_code=status)
        if new:
            security.set_csrf_cookie(request, response, token)
        return security.secure_headers(response)

    def refuse(request: Request, refused: Refusal) -> Response:
        if (
            refused.login
            and request.method == "GET"
            and "text/html" in request.headers.get("accept", "")
        ):
            return render(
                request, "login.html", status=refused.status, page="login", refusal=refused
            )
        return render(request, "refused.html", status=refused.status, page="", refusal=refused)

    async def checked_form(request: Request) -> tuple[Any, Response | None]:
        """The form of a state-changing request, or the response refusing it."""
        refused = guard.refusal(request)
        if refused is not None:
            return None, refuse(request, refused)
        try:
            form = await read_form(request)
        except FormError as exc:
            bad = Refusal(400, "The form could not be read", str(exc))
            return None, render(request, "refused.html", status=400, page="", refusal=bad)
        why = security.csrf_failure(request, form.get(security.CSRF_FIELD) or None)
        if why is not None:
            log.warning("console refused %s %s: %s", request.method, request.url.path, why)
            bad = Refusal(
                403,
                "Refused: the CSRF check failed",
                f"This change was refused because {why}. Reload the page and try again.",
            )
            return None, render(request, "refused.html", status=403, page="", refusal=bad)
        return form, None

    def redirect(url: str) -> Response:
        return security.secure_headers(RedirectResponse(url, status_code=303))

    # -- orders ----------------------------------------------------------------------

    async def orders_page(
        request: Request,
        *,
        form: OrderForm | None = None,
        errors: dict[str, list[str]] | None = None,
        status: int = 200,
        problem: str | None = None,
    ) -> Response:
        runtime = _runtime(request)
        placed = request.query_params.get("placed", "")
        listing: list[Any] = []
        try:
            listing = await runtime.recent_orders(RECENT_ORDERS)
        except sa.exc.SQLAlchemyError as exc:
            problem = problem or f"The database is unavailable ({type(exc).__name__})."
        return render(
            request,
            "orders.html",
            status=status,
            page="orders",
            orders=[order.to_json() for order in listing],
            form=form or OrderForm(idempotency_key=uuid.uuid4().hex),
            errors=errors or {},
            placed=placed if placed.isdigit() else "",
            problem=problem,
        )

    @router.get("/", response_class=HTMLResponse)
    async def orders_view(request: Request) -> Response:
        """Orders: the form to place one and the newest orders, live."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        return await orders_page(request)

    @router.post("/console/orders")
    async def place_order(request: Request) -> Response:
        """Place an order from the form, validated exactly as ``POST /orders``."""
        form, refused = await checked_form(request)
        if refused is not None:
            return refused
        result = validate_order_form(form)
        runtime = _runtime(request)
        if result.request is None:
            runtime.count_invalid()
            return await orders_page(request, form=result.form, errors=result.errors, status=422)
        try:
            created = await runtime.place_order(
                result.request, idempotency_key=result.idempotency_key
            )
        except OrderConflict as exc:
            return await orders_page(
                request, form=result.form, errors={"form": [str(exc)]}, status=409
            )
        except sa.exc.SQLAlchemyError as exc:
            log.error("console: storing an order failed", exc_info=exc)
            return await orders_page(
                request,
                form=result.form,
                status=503,
                problem="The database failed; nothing was stored. Try again.",
            )
        feed.wake()
        return redirect(f"/?placed={created.order.id}")

    # -- flow ------------------------------------------------------------------------

    @router.get("/flow", response_class=HTMLResponse)
    async def flow_view(request: Request) -> Response:
        """Flow: streams, groups and consumers with their figures, live."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        runtime = _runtime(request)
        problem = None
        flow: list[dict[str, Any]] = []
        try:
            for info in await stream_info(runtime.redis, feed.streams):
                data = info.to_json()
                data["rate_per_s"] = feed.rates.observe(info.name, info.entries_added)
                flow.append(data)
        except (RedisError, OSError, OperationError) as exc:
            problem = f"Redis unavailable: {type(exc).__name__}: {exc}"
        return render(request, "flow.html", page="flow", flow=flow, problem=problem)

    # -- events ----------------------------------------------------------------------

    @router.get("/events", response_class=HTMLResponse)
    async def events_view(request: Request) -> Response:
        """Events: the AsyncAPI catalogue for people, live counts, versions in flight."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        runtime = _runtime(request)
        problem = None
        counts: dict[str, Any] = {}
        dead: dict[str, Any] = {}
        flight: dict[str, dict[str, int]] = {}
        try:
            for info in await stream_info(runtime.redis, feed.streams):
                counts[info.name] = info.length
                dead[info.name] = info.dead_letters
            flight = await in_flight(runtime.redis, settings)
        except (RedisError, OSError, OperationError) as exc:
            problem = f"Redis unavailable: {type(exc).__name__}: {exc}"
        return render(
            request,
            "events.html",
            page="events",
            catalogue=events_catalogue,
            counts=counts,
            dead=dead,
            in_flight=flight,
            problem=problem,
        )

    # -- an order's journey ----------------------------------------------------------

    @router.get("/journey/{order_id}", response_class=HTMLResponse)
    async def journey_view(request: Request, order_id: str) -> Response:
        """One order's path as a timeline: accepted, published, each delivery, the status."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        if not order_id.isdigit() or len(order_id) > 19:
            bad = Refusal(400, "Bad order id", f"{order_id!r} is not an order id (digits).")
            return render(request, "refused.html", status=400, page="", refusal=bad)
        try:
            journey = await load_journey(_runtime(request), int(order_id), feed.streams)
        except (RedisError, OSError, OperationError, sa.exc.SQLAlchemyError) as exc:
            down = Refusal(503, "The journey cannot be read", f"{type(exc).__name__}: {exc}")
            return render(request, "refused.html", status=503, page="", refusal=down)
        if journey is None:
            missing = Refusal(404, "No such order", f"There is no order #{order_id}.")
            return render(request, "refused.html", status=404, page="", refusal=missing)
        return render(request, "journey.html", page="journey", journey=journey)

    # -- dead letters ----------------------------------------------------------------

    @router.get("/dead-letters", response_class=HTMLResponse)
    async def dead_letters_view(request: Request) -> Response:
        """Dead letters of each stream: reason, deliveries, payload; replay and purge."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        runtime = _runtime(request)
        pages = []
        problem = None
        try:
            for name in feed.streams:
                pages.append(await list_dead_letters(runtime.redis, name, limit=DEAD_LETTERS_SHOWN))
        except (RedisError, OSError, OperationError) as exc:
            problem = f"Redis unavailable: {type(exc).__name__}: {exc}"
        params = request.query_params
        notice = _NOTICES.get(params.get("notice", ""))
        count = params.get("n", "0")
        text = notice.format(n=int(count) if count.isdigit() else 0) if notice else None
        unknown = params.get("unknown", "0")
        if text and unknown.isdigit() and int(unknown):
            text += f" {int(unknown)} were already gone (replayed or purged meanwhile)."
        newest = []
        with contextlib.suppress(RedisError, OSError, OperationError):
            newest = [await last_dead_letter_id(runtime.redis, p.stream) or "" for p in pages]
        # The same form as the live snapshot's, so the page can tell when it is stale.
        version = ";".join(f"{p.stream}:{p.total}:{n}" for p, n in zip(pages, newest, strict=False))
        return render(
            request,
            "dead_letters.html",
            page="dead-letters",
            pages=pages,
            problem=problem,
            notice=text,
            version=version,
        )

    @router.post("/dead-letters/action")
    async def dead_letter_action(request: Request) -> Response:
        """Replay or purge dead letters (some or all), after a confirmation page."""
        form, refused = await checked_form(request)
        if refused is not None:
            return refused
        stream = form.get("stream")
        action = form.get("action")
        if stream not in feed.streams or action not in _ACTIONS:
            bad = Refusal(400, "Unknown action", f"cannot {action!r} dead letters of {stream!r}")
            return render(request, "refused.html", status=400, page="", refusal=bad)
        every = action.endswith("-all")
        verb = action.removesuffix("-all")
        runtime = _runtime(request)
        try:
            ids = [parse_entry_id(i) for i in form.all("ids")]
            up_to = parse_entry_id(form.get("up_to")) if form.get("up_to") else None
        except ValueError as exc:
            bad = Refusal(400, "Bad dead-letter id", str(exc))
            return render(request, "refused.html", status=400, page="", refusal=bad)
        if not every and not ids:
            return redirect("/dead-letters?notice=none")
        try:
            if form.get("confirmed") != "yes":
                count = len(ids)
                if every:
                    up_to = await last_dead_letter_id(runtime.redis, stream)
                    page = await list_dead_letters(runtime.redis, stream, limit=1)
                    count = page.total
                return render(
                    request,
                    "confirm.html",
                    page="dead-letters",
                    stream=stream,
                    action=action,
                    verb=verb,
                    every=every,
                    ids=ids,
                    up_to=up_to or "",
                    count=count,
                )
            client = request.client.host if request.client else "?"
            if verb == "replay":
                if every:
                    ids = await _ids_up_to(runtime, stream, up_to) if up_to else []
                replayed = await replay_dead_letters(runtime.redis, stream, ids)
                log.info(
                    "console (%s): replayed %d dead letters of %s",
                    client,
                    len(replayed.replayed),
                    stream,
                )
                done, gone = len(replayed.replayed), len(replayed.unknown) + len(replayed.failed)
                notice = "replayed"
            else:
                if every:
                    purged = (
                        await purge_all_dead_letters(runtime.redis, stream, up_to=up_to)
                        if up_to
                        else None
                    )
                else:
                    purged = await purge_dead_letters(runtime.redis, stream, ids)
                done = purged.deleted if purged else 0
                gone = len(purged.unknown) if purged else 0
                log.info("console (%s): purged %d dead letters of %s", client, done, stream)
                notice = "purged"
        except (RedisError, OSError, OperationError) as exc:
            bad = Refusal(503, "Redis failed", f"{type(exc).__name__}: {exc}")
            return render(request, "refused.html", status=503, page="", refusal=bad)
        feed.wake()
        query = urlencode({"notice": notice, "n": done, "unknown": gone})
        return redirect(f"/dead-letters?{query}")

    # -- inbox -----------------------------------------------------------------------

    @router.get("/inbox", response_class=HTMLResponse)
    async def inbox_view(request: Request) -> Response:
        """The emails in the embedded sink's Maildir, newest first."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        listing = await asyncio.to_thread(list_inbox, settings.mail_dir)
        return render(request, "inbox.html", page="inbox", inbox=listing)

    @router.get("/inbox/find", response_class=HTMLResponse)
    async def inbox_find(request: Request) -> Response:
        """Open the email with a given Message-ID (the Orders page links here)."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        message_id = request.query_params.get("message_id", "")
        key = (
            await asyncio.to_thread(find_by_message_id, settings.mail_dir, message_id)
            if message_id
            else None
        )
        if key is None:
            missing = Refusal(
                404, "No such email", f"No email with Message-ID {message_id!r} in the inbox."
            )
            return render(request, "refused.html", status=404, page="inbox", refusal=missing)
        return redirect(f"/inbox/{quote(key, safe='')}")

    @router.get("/inbox/{key}", response_class=HTMLResponse)
    async def message_view(request: Request, key: str) -> Response:
        """One email: headers, text part, and its HTML part in a sandboxed frame."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        view = await asyncio.to_thread(read_message, settings.mail_dir, key)
        if view is None:
            missing = Refusal(404, "No such email", "It may have been removed from the Maildir.")
            return render(request, "refused.html", status=404, page="inbox", refusal=missing)
        return render(request, "message.html", page="inbox", mail=view)

    @router.get("/inbox/{key}/html")
    async def message_html(request: Request, key: str) -> Response:
        """An email's HTML part, for the sandboxed frame: no script, no network."""
        refused = guard.refusal(request)
        if refused is not None:
            return refuse(request, refused)
        view = (
            await asyncio.to_thread(read_message, settings.mail_dir, key)
            if valid_key(key)
            else None
        )
        if view is None or view.html is None:
            return security.secure_headers(
                Response("no HTML part", status_code=404, media_type="text/plain"),
                csp=security.EMAIL_CSP,
                framing="SAMEORIGIN",
            )
        response = HTMLResponse(view.html)
        return security.secure_headers(response, csp=security.EMAIL_CSP, framing="SAMEORIGIN")

    # -- live, static, login ---------------------------------------------------------

    @router.get("/console/events")
    async def events(request: Request) -> Response:
        """Server-Sent Events: a snapshot now, then each tick heard on the channel."""
        refused = guard.refusal(request)
        if refused is not None:
            return security.secure_headers(
                Response(refused.detail, status_code=refused.status, media_type="text/plain")
            )
        response = StreamingResponse(
            feed.events(_runtime(request)),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )
        return security.secure_headers(response)

    @router.get("/console/static/{name}")
    async def static(name: str) -> Response:
        """The console's script and style sheet (no data in them, so no guard)."""
        media = _STATIC.get(name)
        if media is None:
            return security.secure_headers(
                Response("not found", status_code=404, media_type="text/plain")
            )
        body = resources.files("orderflow.console").joinpath("static", name).read_bytes()
        response = Response(body, media_type=media)
        security.secure_headers(response)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @router.get("/console/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        """The admin-token form (only when ORDERFLOW_ADMIN_TOKEN is set)."""
        if not guard.token_required:
            return redirect("/")
        refused = guard.configuration_refusal()
        if refused is not None:
            return render(request, "refused.html", status=refused.status, page="", refusal=refused)
        return render(request, "login.html", page="login", refusal=None)

    @router.post("/console/login")
    async def login(request: Request) -> Response:
        """Check the admin token; on success remember the login in a cookie."""
        refused = guard.configuration_refusal()
        if refused is not None or not guard.token_required:
            return redirect("/")
        try:
            form = await read_form(request)
        except FormError as exc:
            bad = Refusal(400, "The form could not be read", str(exc))
            return render(request, "refused.html", status=400, page="", refusal=bad)
        why = security.csrf_failure(request, form.get(security.CSRF_FIELD) or None)
        if why is not None:
            bad = Refusal(403, "Refused: the CSRF check failed", f"{why}; reload and try again.")
            return render(request, "refused.html", status=403, page="", refusal=bad)
        if not guard.check_token(form.get("token")):
            log.warning("console: wrong admin token from %s", request.client)
            wrong = Refusal(401, "Wrong token", "That is not the admin token.", login=True)
            return render(request, "login.html", status=401, page="login", refusal=wrong)
        response = redirect("/")
        guard.set_session(request, response)
        return response

    return router


def _runtime_of(app: FastAPI) -> OrderRuntime:
    runtime: OrderRuntime = app.state.orders
    return runtime


async def _ids_up_to(runtime: OrderRuntime, stream: str, up_to: str) -> list[str]:
    """Ids of the dead letters of ``stream`` up to ``up_to`` (the ones confirmed)."""
    dlq = dead_letter_stream(stream)
    ids: list[str] = []
    cursor = "-"
    while True:
        rows: Any = await runtime.redis.xrange(dlq, cursor, up_to, count=BATCH_SIZE)
        if not rows:
            return ids
        ids.extend(row[0].decode() for row in rows)
        cursor = "(" + ids[-1]
