"""The HTTP API: creating and reading orders, idempotency, atomicity, health, metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import MutableMapping
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from orderflow.embedded.redis_server import RedisServer
from orderflow.orders import api as orders_api
from tests.support import order_body

from .conftest import Api, make_settings, running_api, stream_events

with_redis_server = pytest.mark.usefixtures("redis_server")


async def test_create_then_get(api: Api, aredis: Any) -> None:
    response = await api.post(order_body(items=[{"name": "mug", "quantity": 2}]))

    assert response.status_code == 201, response.text
    order = response.json()
    assert response.headers["location"] == f"/orders/{order['id']}"
    assert "idempotent-replayed" not in response.headers
    assert order["email_status"] == "pending"
    fetched = await api.client.get(response.headers["location"])
    assert fetched.status_code == 200
    assert fetched.json() == order

    assert await api.runtime.relay.publish_pending() == 1
    entries = await aredis.xrange("orders")
    assert len(entries) == 1
    _, fields = entries[0]
    assert fields[b"ce_type"] == b"order.created"
    assert fields[b"ce_source"] == b"orderflow/orders"
    assert fields[b"ce_dataschema"] == b"urn:orderflow:schema:order.created:2"
    (event,) = await stream_events(aredis)
    assert event == {
        "customer": {"email": order["email"]},
        "lines": order["items"],
        **{key: order[key] for key in ("id", "total", "currency", "created_at")},
    }
    assert event["total"] == "100.00"


async def test_get_unknown_and_malformed_ids(api: Api) -> None:
    missing = await api.client.get("/orders/424242")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"

    malformed = await api.client.get("/orders/abc")
    assert malformed.status_code == 422
    assert malformed.json()["errors"][0]["field"] == "order_id"


async def test_valid_order_is_normalised_exactly(api: Api, aredis: Any) -> None:
    body = (
        b'{"email": "Alice@EXAMPLE.com", "total": 19.99, "currency": "eur",'
        b' "items": [{"name": "book", "quantity": 2, "price": 9.99}]}'
    )
    response = await api.post(body)

    assert response.status_code == 201, response.text
    order = response.json()
    assert order["email"] == "Alice@example.com"
    assert order["total"] == "19.99"
    assert order["currency"] == "EUR"
    assert order["items"] == [{"name": "book", "quantity": 2, "price": "9.99"}]
    assert await api.runtime.relay.publish_pending() == 1
    (event,) = await stream_events(aredis)
    assert event["total"] == "19.99"


@pytest.mark.parametrize("total", ["100", "100.0", "100.00", 100])
async def test_total_spellings_are_the_same_amount(api: Api, total: Any) -> None:
    response = await api.post(order_body(total=total))
    assert response.status_code == 201
    assert response.json()["total"] == "100.00"


async def test_largest_total_is_exact(api: Api) -> None:
    response = await api.post(order_body(total="9999999999.99"))
    assert response.status_code == 201
    fetched = await api.client.get(response.headers["location"])
    assert fetched.json()["total"] == "9999999999.99"


# -- idempotency ------------------------------------------------------------------------


async def test_same_idempotency_key_same_body_is_one_order_and_one_event(
    api: Api, aredis: Any
) -> None:
    first = await api.post(order_body(), key="k-1")
    again = await api.post(order_body(total=100), key="k-1")  # same order, other spelling

    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await api.counts() == {"orders": 1, "outbox": 1, "idempotency_keys": 1}
    assert await api.runtime.relay.publish_pending() == 1
    assert await aredis.xlen("orders") == 1


async def test_same_idempotency_key_other_body_is_409(api: Api) -> None:
    assert (await api.post(order_body(), key="k-2")).status_code == 201

    conflict = await api.post(order_body(total="99.00"), key="k-2")

    assert conflict.status_code == 409
    assert conflict.headers["content-type"] == "application/problem+json"
    assert "Idempotency-Key" in conflict.json()["detail"]
    assert (await api.counts())["orders"] == 1


async def test_same_client_id_same_body_is_the_same_order(api: Api, aredis: Any) -> None:
    first = await api.post(order_body(id=101))
    again = await api.post(order_body(id=101, total="100.0"))

    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == 101
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert await api.runtime.relay.publish_pending() == 1
    assert await aredis.xlen("orders") == 1


async def test_same_client_id_other_body_is_409(api: Api) -> None:
    assert (await api.post(order_body(id=102))).status_code == 201

    conflict = await api.post(order_body(id=102, email="mallory@example.com"))

    assert conflict.status_code == 409
    assert "102" in conflict.json()["detail"]
    order = (await api.client.get("/orders/102")).json()
    assert order["email"] == "buyer1@example.com"


async def test_concurrent_retries_with_one_key_make_one_order(api: Api, aredis: Any) -> None:
    responses = await asyncio.gather(*(api.post(order_body(), key="k-race") for _ in range(20)))

    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert await api.counts() == {"orders": 1, "outbox": 1, "idempotency_keys": 1}
    assert await api.runtime.relay.publish_pending() == 1
    assert await aredis.xlen("orders") == 1


async def test_concurrent_creates_with_one_client_id_make_one_order(api: Api) -> None:
    responses = await asyncio.gather(*(api.post(order_body(id=555)) for _ in range(20)))

    assert {r.status_code for r in responses} == {201}
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert (await api.counts())["outbox"] == 1


async def test_assigned_ids_skip_ids_clients_chose(api: Api) -> None:
    chosen = await api.post(order_body(id=1))
    assigned = [await api.post(order_body(n)) for n in range(2, 5)]
    high = await api.post(order_body(id=1000))
    after = await api.post(order_body(9))

    assert chosen.status_code == high.status_code == after.status_code == 201
    ids = [chosen.json()["id"], *(r.json()["id"] for r in assigned), 1000, after.json()["id"]]
    assert len(set(ids)) == len(ids)
    assert after.json()["id"] > 1000


# -- atomicity ----------------------------------------------------------------------------


def _break_outbox_inserts(api: Api) -> None:
    """A trigger that makes every outbox insert fail: the transaction must roll back."""
    db = api.runtime.db
    with db.engine.begin() as conn:
        if db.is_sqlite:
            conn.exec_driver_sql(
                "CREATE TRIGGER outbox_broken BEFORE INSERT ON outbox "
                "BEGIN SELECT RAISE(ABORT, 'outbox is broken'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION outbox_broken() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'outbox is broken'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER outbox_broken BEFORE INSERT ON outbox "
                "FOR EACH ROW EXECUTE FUNCTION outbox_broken()"
            )


async def test_failed_transaction_stores_nothing_and_publishes_nothing(
    api: Api, aredis: Any
) -> None:
    await api.runtime.db.run(_break_outbox_inserts, api)

    response = await api.post(order_body(id=77), key="k-fail")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert await api.counts() == {"orders": 0, "outbox": 0, "idempotency_keys": 0}
    assert (await api.client.get("/orders/77")).status_code == 404
    assert await api.runtime.relay.publish_pending() == 0
    assert await aredis.exists("orders") == 0


# -- health and metrics -------------------------------------------------------------------


async def test_health_is_503_while_redis_is_down(
    database_url: str, redis_server: RedisServer, tmp_path: Any
) -> None:
    settings = make_settings(database_url, redis_server.url, tmp_path)
    async with running_api(settings) as api:
        healthy = await api.client.get("/health")
        assert healthy.status_code == 200
        assert healthy.json()["redis"] == "ok"
        assert healthy.json()["database"] == "ok"

        redis_server.stop()
        down = await api.client.get("/health")
        assert down.status_code == 503
        assert down.json()["redis"].startswith("down")
        assert down.json()["database"] == "ok"

        redis_server.start()
        assert (await api.client.get("/health")).status_code == 200


async def test_health_is_503_while_the_database_is_down(api: Api) -> None:
    db = api.runtime.db

    def broken_ping() -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("database is away"))

    db.ping = broken_ping  # type: ignore[method-assign]
    down = await api.client.get("/health")
    assert down.status_code == 503
    assert down.json()["database"].startswith("down")
    assert down.json()["redis"] == "ok"


async def test_metrics_show_orders_backlog_and_bus(api: Api) -> None:
    assert (await api.post(order_body())).status_code == 201
    assert (await api.post(order_body(2))).status_code == 201

    text = (await api.client.get("/metrics")).text
    assert "orderflow_orders_created_total" in text
    assert "orderflow_outbox_backlog 2.0" in text

    await api.runtime.relay.publish_pending()
    text = (await api.client.get("/metrics")).text
    assert "orderflow_outbox_backlog 0.0" in text
    assert 'orderflow_published_total{stream="orders"}' in text


async def test_openapi_documents_the_order_body(api: Api) -> None:
    schema = (await api.client.get("/openapi.json")).json()
    body = schema["paths"]["/orders"]["post"]["requestBody"]["content"]["application/json"]
    components = schema["components"]["schemas"]
    flat, v2 = (components[ref["$ref"].rsplit("/", 1)[1]] for ref in body["schema"]["oneOf"])
    assert set(flat["required"]) == {"email", "total"}
    assert set(v2["required"]) == {"customer", "total"}
    # Every $ref of the body resolves within the document.
    refs = re.findall(
        r'"\$ref": ?"#/components/schemas/([^"]+)"', orjson.dumps(components).decode()
    )
    assert set(refs) <= set(components)


# -- POST /orders: the lean ASGI path and the FastAPI route answer alike ---------------


def _route_only(api: Api) -> httpx.AsyncClient:
    """A client on the app's FastAPI stack alone, past OrderServiceApp's lean path."""

    async def fastapi_app(scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(api.app, scope, receive, send)

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=fastapi_app), base_url=BASE)


BASE = "http://orders.test"
_VOLATILE = ("id", "created_at", "email", "instance")


def _comparable(response: httpx.Response) -> tuple[Any, ...]:
    body = response.json()
    for key in _VOLATILE:
        body.pop(key, None)
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    headers.pop("location", None)
    return response.status_code, headers, body


_REQUESTS: list[tuple[str, dict[str, str], Any]] = [
    ("created", {}, order_body(7, items=[{"name": "mug", "quantity": 2, "price": "1.50"}])),
    ("client id", {}, order_body(11, id=4242)),
    ("not JSON media", {"content-type": "text/plain"}, order_body(8)),
    ("+json media", {"content-type": "application/merge-patch+json"}, order_body(9)),
    ("empty media", {"content-type": ""}, order_body(12)),
    ("invalid JSON", {}, b"{nope"),
    ("not an object", {}, b"[1, 2]"),
    ("duplicate keys", {}, b'{"email": "a@example.com", "email": "b@example.com", "total": 1}'),
    ("invalid fields", {}, {"email": "nobody", "total": "-1", "extra": 1}),
    ("empty key", {"idempotency-key": ""}, order_body(10)),
    ("too big", {}, b'{"email": "' + b"x" * 70_000 + b'"}'),
]


@pytest.mark.parametrize(("case", "headers", "body"), _REQUESTS, ids=[r[0] for r in _REQUESTS])
async def test_lean_path_answers_as_the_fastapi_route(
    api: Api, monkeypatch: pytest.MonkeyPatch, case: str, headers: dict[str, str], body: Any
) -> None:
    lean_calls: list[str] = []
    lean_path = orders_api._post_orders

    async def counted(*args: Any) -> None:
        lean_calls.append(case)
        await lean_path(*args)

    monkeypatch.setattr(orders_api, "_post_orders", counted)
    async with _route_only(api) as route:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"content-type": "application/json", **headers}
        lean = await api.client.post("/orders", content=content, headers=headers)
        assert lean_calls == [case]
        if not isinstance(body, bytes) and "id" in body:
            content = orjson.dumps({**body, "id": body["id"] + 1000})
        reference = await route.post("/orders", content=content, headers=headers)
        assert lean_calls == [case]  # the FastAPI route answered, not the lean path
    assert _comparable(lean) == _comparable(reference)
    if lean.status_code >= 400:
        assert lean.json()["instance"] == "/orders"
        assert lean.headers["content-type"] == "application/problem+json"


async def test_lean_path_replays_and_conflicts_as_the_fastapi_route(api: Api) -> None:
    async with _route_only(api) as route:
        for client, key in ((api.client, "lean"), (route, "route")):
            first = await client.post(
                "/orders", json=order_body(1), headers={"Idempotency-Key": key}
            )
            again = await client.post(
                "/orders", json=order_body(1), headers={"Idempotency-Key": key}
            )
            other = await client.post(
                "/orders", json=order_body(2), headers={"Idempotency-Key": key}
            )
            assert first.status_code == again.status_code == 201
            assert "idempotent-replayed" not in first.headers
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == first.json()
            assert again.headers["location"] == f"/orders/{first.json()['id']}"
            assert other.status_code == 409
            assert other.json()["type"] == "urn:orderflow:problem:conflict"
    assert (await api.counts())["orders"] == 2


async def test_lean_path_answers_503_when_the_database_fails(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(*_: Any, **__: Any) -> Any:
        raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(api.runtime.writer, "create", failing)
    async with _route_only(api) as route:
        lean = await api.post(order_body(1))
        reference = await route.post("/orders", json=order_body(1))
    assert lean.status_code == 503
    assert _comparable(lean) == _comparable(reference)


async def _asgi_post(
    api: Api,
    messages: list[dict[str, Any]],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> list[dict[str, Any]]:
    """POST /orders straight through ASGI, the body in ``messages``; what was sent back."""
    sent: list[dict[str, Any]] = []
    inbox = list(messages)

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "headers": [(b"content-type", b"application/json")] if headers is None else headers,
    }
    await api.app(scope, receive, send)
    return sent


async def test_lean_path_reads_a_body_in_chunks(api: Api) -> None:
    body = orjson.dumps(order_body(3))
    chunks = [body[i : i + 5] for i in range(0, len(body), 5)]
    sent = await _asgi_post(
        api,
        [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        + [{"type": "http.request", "body": b"", "more_body": False}],
    )
    assert sent[0]["status"] == 201
    assert orjson.loads(sent[1]["body"])["email"] == "buyer3@example.com"


async def test_lean_path_refuses_a_chunked_body_over_the_limit(api: Api) -> None:
    chunk = {"type": "http.request", "body": b" " * 10_000, "more_body": True}
    sent = await _asgi_post(api, [chunk] * 7)
    assert sent[0]["status"] == 422
    assert orjson.loads(sent[1]["body"])["errors"] == [
        {"field": "body", "message": "is over 65536 bytes"}
    ]
    assert (await api.counts())["orders"] == 0


async def test_lean_path_stores_nothing_when_the_client_goes_away(api: Api) -> None:
    sent = await _asgi_post(
        api,
        [
            {"type": "http.request", "body": b'{"email": ', "more_body": True},
            {"type": "http.disconnect"},
        ],
    )
    assert sent == []
    assert (await api.counts())["orders"] == 0


async def test_lean_path_takes_a_body_without_content_type_as_json(api: Api) -> None:
    body = {"type": "http.request", "body": orjson.dumps(order_body(4)), "more_body": False}
    sent = await _asgi_post(api, [body], headers=[])
    assert sent[0]["status"] == 201
    assert (b"location", b"/orders/1") in sent[0]["headers"]
