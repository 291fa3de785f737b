"""The shared test helpers decide pass or fail too: they are tested like the rest."""

from __future__ import annotations

import time

import pytest

from tests import support


async def test_wait_until_returns_the_first_truthy_value_and_names_what_timed_out() -> None:
    values = iter([0, None, 7])
    assert await support.wait_until(lambda: next(values), interval=0.001) == 7

    async def never() -> bool:
        return False

    started = time.monotonic()
    with pytest.raises(AssertionError, match="waiting for the moon"):
        await support.wait_until(never, timeout=0.05, interval=0.01, what="the moon")
    assert time.monotonic() - started < 2


def test_poll_until_blocks_until_true_or_fails_naming_what() -> None:
    values = iter([False, "yes"])
    assert support.poll_until(lambda: next(values), interval=0.001) == "yes"
    with pytest.raises(AssertionError, match="waiting for nothing"):
        support.poll_until(lambda: False, timeout=0.02, interval=0.005, what="nothing")


def test_clean_env_drops_every_orderflow_setting_but_the_server_under_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", "redis://elsewhere")
    monkeypatch.setenv("ORDERFLOW_REDIS_SERVER", "/opt/valkey-server")
    monkeypatch.setenv("UNRELATED", "kept")
    env = support.clean_env(ORDERFLOW_DATA_DIR="/tmp/x")
    assert env["UNRELATED"] == "kept"
    assert sorted(k for k in env if k.startswith("ORDERFLOW_")) == [
        "ORDERFLOW_DATA_DIR",
        "ORDERFLOW_REDIS_SERVER",
    ]
    support.clear_orderflow_env(monkeypatch)
    assert "ORDERFLOW_REDIS_URL" not in support.clean_env()
    assert support.clean_env()["ORDERFLOW_REDIS_SERVER"] == "/opt/valkey-server"


@pytest.mark.parametrize(
    ("raw", "order_id"),
    [
        (b"From: a@b\r\nMessage-ID: <order-101@shop.test>\r\n\r\nbody", 101),
        (b"message-id: <order-7@x>\r\n\r\n", 7),
        (b"From: a@b\r\n\r\nMessage-ID: <order-5@x> in the body only", None),
        (b"Message-ID: <invoice-9@x>\r\n\r\n", None),
    ],
)
def test_order_id_of_reads_the_message_id_header_only(raw: bytes, order_id: int | None) -> None:
    assert support.order_id_of(raw) == order_id
