"""Least privilege: each service works with its own documented ACL user, and no further."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.retry import Retry

from orderflow.app import create_app
from orderflow.bus import Message, StreamPublisher, connect
from orderflow.cli import main
from orderflow.config import Settings
from orderflow.email import EmailService, SmtpSender
from orderflow.embedded.smtp_server import SmtpServer
from tests.support import CountingHandler, wait_until

from .conftest import ACL_BLOCK, ACL_BLOCK_NO_SELECTORS, AclRedis, documented_acl_lines

ORDER = b'{"id":101,"email":"alice@example.com","total":"100.00"}'


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    """A counting SMTP server."""
    server = SmtpServer(CountingHandler(), port=0)
    await server.start()
    yield server
    await server.stop()


def test_the_documented_users_are_the_three_services(acl_redis: AclRedis) -> None:
    assert acl_redis.users == ["default", "order-service", "email-service", "orderflow-operator"]


async def test_order_service_works_with_its_user(acl: AclRedis, tmp_path: Path) -> None:
    settings = Settings(
        redis_url=SecretStr(acl.url("order-service")),
        database_url=SecretStr(f"sqlite:///{tmp_path / 'orders.db'}"),
        data_dir=tmp_path,
        claim_idle_ms=200,
        reconcile_after_s=0.5,
    )
    app = create_app(settings)
    admin = acl.admin()
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                assert (await http.get("/health")).json()["redis"] == "ok"
                body = {"id": 101, "email": "alice@example.com", "total": "100.00"}
                assert (await http.post("/orders", json=body)).status_code == 201
                await wait_until(lambda: admin.xlen("orders") >= 1, timeout=10)
                # Reconciliation publishes it again (still unconfirmed after 0.5 s).
                await wait_until(lambda: admin.xlen("orders") >= 2, timeout=10)
                # The Email Service's outcome reaches the order.
                sent = Message.event(
                    "email.sent",
                    {"order_id": 101, "message_id": "<order-101@x>", "at": "2026-01-01T00:00:00Z"},
                    source="orderflow/email",
                )
                publisher_client = connect(acl.admin_url)
                try:
                    await StreamPublisher(publisher_client).publish("email-events", sent)
                finally:
                    await publisher_client.aclose()

                async def confirmed() -> bool:
                    order = (await http.get("/orders/101")).json()
                    return bool(order["email_status"] == "sent")

                await wait_until(confirmed, timeout=10)
    finally:
        admin.close()
    assert acl.denials("order-service") == []


async def test_email_service_works_with_its_user(
    acl: AclRedis, smtp: SmtpServer, tmp_path: Path
) -> None:
    admin = acl.admin()
    # An entry left pending by a dead consumer: the service must claim it.
    admin.xgroup_create("orders", "email-service", id="0", mkstream=True)
    admin.xadd("orders", {"data": ORDER})
    admin.xreadgroup("email-service", "dead-consumer", {"orders": ">"})
    admin.xadd("orders", {"data": b'{"id":102,"email":"bob@example.com","total":5}'})
    admin.xadd("orders", {"data": b"not json"})
    settings = Settings(
        redis_url=SecretStr(acl.url("email-service")),
        smtp_url=SecretStr(smtp.url),
        data_dir=tmp_path,
        claim_idle_ms=200,
    )
    client = connect(acl.url("email-service"))
    sender = SmtpSender(smtp.url)
    service = EmailService(
        settings,
        client,
        sender,
        worker_options={"block_ms": 100, "prune_idle_ms": 1000, "retry_base_ms": 20},
    )
    handler: CountingHandler = smtp.handler
    # A slow server: each entry is held for several heartbeats (every ~67 ms here).
    handler.delay_s = 0.3
    admin.config_resetstat()
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: handler.by_order[101] == 1 and handler.by_order[102] == 1)
        await wait_until(lambda: admin.xlen("orders:dlq") == 1)
        # Each loop did its work as this user: the claim loop took the dead consumer's
        # entry (order 101 above), the heartbeat refreshed held entries (its XCLAIM),
        # and the prune loop removed the dead consumer once idle and owning nothing.
        await wait_until(lambda: _calls(admin, "xclaim") > 0, what="a heartbeat")
        await wait_until(lambda: not _has_consumer(admin, "dead-consumer"), what="a prune")
        assert admin.xpending("orders", "email-service")["pending"] == 0
        assert admin.xlen("email-events") == 2
        assert admin.hget("orderflow:email:{101}", "state") == b"sent"
    finally:
        service.stop()
        await asyncio.wait_for(task, 10)
        await sender.close()
        await client.aclose()
        admin.close()
    assert acl.denials("email-service") == []


def test_operator_commands_work_with_the_operator_user(
    acl: AclRedis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = acl.admin()
    admin.xgroup_create("orders", "email-service", id="0", mkstream=True)
    admin.xadd("orders", {"data": ORDER})
    admin.xadd("orders:dlq", {"data": ORDER, "error": "test", "source_id": "1-0"})
    admin.xadd("orders:dlq", {"data": ORDER, "error": "test", "source_id": "2-0"})
    admin.close()
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", acl.url("orderflow-operator"))
    assert main(["streams", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["streams"][0]["length"] == 1
    assert main(["dlq", "list"]) == 0
    dead_id = admin_first_dead_letter(acl)
    assert main(["dlq", "replay", dead_id]) == 0
    assert main(["dlq", "purge", "--all", "--yes"]) == 0
    assert main(["group", "reset", "email-service", "--to", "beginning"]) == 0
    capsys.readouterr()
    assert acl.denials("orderflow-operator") == []


def admin_first_dead_letter(acl: AclRedis) -> str:
    """The id of the oldest dead letter."""
    client = acl.admin()
    try:
        ((entry_id, _),) = client.xrange("orders:dlq", count=1)
    finally:
        client.close()
    return str(entry_id.decode())


@pytest.mark.parametrize(
    ("user", "command"),
    [
        ("order-service", ["HGET", "orderflow:email:{101}", "state"]),
        ("order-service", ["DEL", "orders"]),
        ("order-service", ["SET", "x", "1"]),
        ("order-service", ["FLUSHALL"]),
        ("order-service", ["CONFIG", "GET", "*"]),
        ("order-service", ["KEYS", "*"]),
        ("email-service", ["XADD", "orders", "*", "data", "{}"]),
        ("email-service", ["DEL", "orders"]),
        ("email-service", ["XTRIM", "orders", "MAXLEN", "0"]),
        ("email-service", ["HSET", "other", "a", "b"]),
        ("email-service", ["FLUSHALL"]),
        ("email-service", ["SHUTDOWN"]),
        ("email-service", ["PUBLISH", "orders", "{}"]),
        ("orderflow-operator", ["HGET", "orderflow:email:{101}", "state"]),
        ("orderflow-operator", ["DEL", "orders"]),
        ("orderflow-operator", ["FLUSHALL"]),
        ("orderflow-operator", ["CONFIG", "SET", "appendonly", "no"]),
        ("orderflow-operator", ["ACL", "LIST"]),
    ],
)
def test_each_user_is_refused_outside_its_keys_and_commands(
    acl: AclRedis, user: str, command: list[str]
) -> None:
    client: Any = redis.Redis.from_url(acl.url(user))
    try:
        assert client.ping()
        if not acl.selectors and (user, command[0]) in ALLOWED_WITHOUT_SELECTORS:
            # docs/SECURITY.md says so for Redis 6.2: the command goes through.
            client.execute_command(*command)
            return
        with pytest.raises(NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()


#: What docs/SECURITY.md's Redis 6.2 lines allow beyond the others (no selectors there).
ALLOWED_WITHOUT_SELECTORS = {
    ("email-service", "XADD"),
    ("email-service", "XTRIM"),
    ("email-service", "DEL"),
}


def test_the_documented_lines_for_this_server_are_loaded(acl_redis: AclRedis) -> None:
    """Selectors decide which block: and the 6.2 block is the one without them."""
    block = ACL_BLOCK if acl_redis.selectors else ACL_BLOCK_NO_SELECTORS
    assert len(documented_acl_lines(block)) == 4
    assert not any(
        "(" in line or "%R" in line for line in documented_acl_lines(ACL_BLOCK_NO_SELECTORS)
    )


def test_the_default_user_is_closed(acl: AclRedis) -> None:
    # No retries: redis-py would retry an authentication failure with backoff.
    client = redis.Redis(port=acl.server.port, retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(AuthenticationError):
            client.ping()
    finally:
        client.close()


@pytest.mark.parametrize("ordered", [False, True], ids=["competing", "ordered"])
async def test_email_service_on_partitions_works_with_its_user(
    acl: AclRedis, smtp: SmtpServer, tmp_path: Path, ordered: bool
) -> None:
    admin = acl.admin()
    # Two partitions, recorded as a relay records them; one order in each.
    admin.set("orderflow:partitions:{orders}", 2)
    admin.xadd("{orders:0}", {"data": ORDER})
    admin.xadd("{orders:1}", {"data": b'{"id":102,"email":"bob@example.com","total":5}'})
    settings = Settings(
        redis_url=SecretStr(acl.url("email-service")),
        smtp_url=SecretStr(smtp.url),
        data_dir=tmp_path,
        claim_idle_ms=200,
        ordered=ordered,
    )
    client = connect(acl.url("email-service"))
    sender = SmtpSender(smtp.url)
    service = EmailService(settings, client, sender, worker_options={"block_ms": 100})
    handler: CountingHandler = smtp.handler
    handler.delay_s = 0.3  # entries held over several heartbeats
    admin.config_resetstat()
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: handler.by_order[101] == 1 and handler.by_order[102] == 1)
        if ordered:
            # Membership refreshed twice after the first rebalance: every rebalance
            # after the leases were taken renewed them (GET + PEXPIRE in one script).
            await wait_until(lambda: _calls(admin, "zadd") >= 3, what="three rebalances")
            await wait_until(lambda: _calls(admin, "set") >= 2, what="both leases taken")
        else:
            # Each partition's claim loop ran twice, and a heartbeat refreshed an entry.
            await wait_until(lambda: _calls(admin, "xautoclaim") >= 4, what="claim passes")
            await wait_until(lambda: _calls(admin, "xclaim") > 0, what="a heartbeat")
    finally:
        service.stop()
        await asyncio.wait_for(task, 10)
        await sender.close()
        await client.aclose()
        admin.close()
    assert acl.denials("email-service") == []


def _calls(admin: redis.Redis, command: str) -> int:
    """How many times the server ran ``command`` since CONFIG RESETSTAT, counting the
    commands scripts ran (INFO commandstats)."""
    stats: dict[str, Any] = admin.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _has_consumer(admin: redis.Redis, name: str) -> bool:
    consumers = admin.xinfo_consumers("orders", "email-service")
    return any(c["name"] in (name, name.encode()) for c in consumers)
