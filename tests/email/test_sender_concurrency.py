"""The SMTP adapter's adaptive concurrency limit against a real aiosmtpd server, and its setting."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from orderflow.cli import main
from orderflow.config import Settings
from orderflow.email import Renderer, SmtpSender, TransientSendError, parse_order
from orderflow.email.concurrency import AdaptiveLimit
from tests.support import clear_orderflow_env, wait_until

from .conftest import SmtpFixture

RENDERER = Renderer("orderflow <orders@orderflow.localhost>")


async def send(sender: SmtpSender, order_id: int) -> None:
    order = parse_order({"id": order_id, "email": "alice@example.com", "total": 1})
    await sender.send(RENDERER.render(order))


def gauge(sender: SmtpSender) -> float | None:
    return REGISTRY.get_sample_value(
        "orderflow_email_smtp_concurrency_limit", {"destination": sender.destination}
    )


async def test_sends_beyond_the_limit_wait_having_transmitted_nothing(smtp: SmtpFixture) -> None:
    """The adaptive limit starts at one: while the first transaction hangs at the
    server, the others have not even connected; once it fails (timeout), they go."""
    smtp.handler.stall_next = 1
    sender = SmtpSender(f"{smtp.url}?timeout=1", pool_size=4)
    try:
        sends = [asyncio.create_task(send(sender, n)) for n in (1, 2, 3)]
        await asyncio.wait_for(smtp.handler.stalled.wait(), 10)
        await asyncio.sleep(0.2)  # room for a send that should not start to start
        assert smtp.handler.data_attempts == 1
        assert sender.connections_opened == 1
        assert sender.limiter.in_flight == 1
        results = await asyncio.gather(*sends, return_exceptions=True)
    finally:
        await sender.close()
    assert isinstance(results[0], TransientSendError)
    assert results[1:] == [None, None]
    assert len(smtp.handler.received) == 2


async def test_with_a_fixed_limit_every_connection_of_the_pool_is_used_at_once(
    smtp: SmtpFixture,
) -> None:
    smtp.handler.stall_next = 1
    sender = SmtpSender(f"{smtp.url}?timeout=1", pool_size=4, adaptive=False)
    try:
        sends = [asyncio.create_task(send(sender, n)) for n in (1, 2, 3)]
        await wait_until(lambda: len(smtp.handler.received) == 2)
        assert sender.connections_opened == 3
        await asyncio.gather(*sends, return_exceptions=True)
    finally:
        await sender.close()
    assert gauge(sender) == 4


async def test_a_send_keeps_its_place_until_the_holding_block_ends(smtp: SmtpFixture) -> None:
    sender = SmtpSender(smtp.url, pool_size=4)
    try:
        with sender.holding():
            await send(sender, 1)
            assert sender.limiter.in_flight == 1, "sent, not yet recorded"
        assert sender.limiter.in_flight == 0
        await send(sender, 2)
        assert sender.limiter.in_flight == 0, "outside a holding block: given back on its 250"
    finally:
        await sender.close()


async def test_the_fixed_limit_gives_a_place_back_on_the_250_even_when_held(
    smtp: SmtpFixture,
) -> None:
    """``fixed`` is the behaviour before the adaptive limit, for comparisons."""
    sender = SmtpSender(smtp.url, pool_size=4, adaptive=False)
    try:
        with sender.holding():
            await send(sender, 1)
            assert sender.limiter.in_flight == 0
    finally:
        await sender.close()


async def test_a_failed_send_gives_its_place_back_at_once(smtp: SmtpFixture) -> None:
    smtp.handler.data_replies.append("451 try later")
    sender = SmtpSender(smtp.url, pool_size=4)
    try:
        with sender.holding():
            with pytest.raises(TransientSendError, match="451"):
                await send(sender, 1)
            assert sender.limiter.in_flight == 0
    finally:
        await sender.close()


async def test_the_limit_is_a_gauge_per_destination_that_follows_every_change(
    smtp: SmtpFixture,
) -> None:
    """The sender's limit, driven by replies told to it directly (a server whose rate
    grows with what is in flight, on a clock of the test's), is its gauge at every
    step; real sends leave the two equal too. No timing of this machine decides."""
    sender = SmtpSender(smtp.url, pool_size=4)
    try:
        assert sender.destination == f"{sender.config.host}:{sender.config.port}"
        assert gauge(sender) == 1
        algorithm = sender.limiter.algorithm
        assert isinstance(algorithm, AdaptiveLimit)
        now = 0.0
        for _ in range(10_000):
            if algorithm.limit == 4:
                break
            now += 0.01 / algorithm.limit
            algorithm.succeeded(0.001, algorithm.limit, now)
            assert gauge(sender) == algorithm.limit
        assert algorithm.limit == 4
        algorithm.dropped(now)
        assert gauge(sender) == 2
        await asyncio.gather(*(send(sender, n) for n in range(1, 17)))
        assert len(smtp.handler.received) == 16
        assert gauge(sender) == sender.limiter.limit
    finally:
        await sender.close()


def test_the_setting_accepts_adaptive_and_fixed_only() -> None:
    assert Settings().smtp_concurrency == "adaptive"
    assert Settings(smtp_concurrency="fixed").smtp_concurrency == "fixed"
    with pytest.raises(
        ValidationError, match="ORDERFLOW_SMTP_CONCURRENCY must be adaptive or fixed"
    ):
        Settings(smtp_concurrency="sometimes")


def test_the_worker_refuses_a_bad_setting_before_connecting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clear_orderflow_env(monkeypatch)
    monkeypatch.setenv("ORDERFLOW_SMTP_CONCURRENCY", "32")
    # Nothing listens there: the error must come before any connection is tried.
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(SystemExit) as exited:
        main(["email", "worker"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err
    assert "ORDERFLOW_SMTP_CONCURRENCY must be adaptive or fixed, got '32'" in err
