"""The peers of bench case 3 (bench/peers): each takes an order and emails it, refuses
bad input naming the field, and the report compares orderflow with each one."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from bench import report
from bench.case_end_to_end import (
    _MESSAGE_ID,
    CPU_PER_EMAIL,
    LATENCY,
    PEER_LATENCY,
    PEER_SATURATION,
    PEERS,
    SATURATION,
    WORKERS,
)
from bench.common import Figure
from bench.peers import MAIL_FROM, SmtpPool
from bench.peers import stack as peers_stack
from bench.peers.minimal_stack import InvalidOrder, parse_order, render

from orderflow.embedded.smtp_server import SmtpServer
from tests.support import CountingHandler, wait_until


def order(order_id: int = 7, **overrides: Any) -> dict[str, Any]:
    """The body the case's load generator sends."""
    body: dict[str, Any] = {
        "id": order_id,
        "email": f"customer{order_id}@example.com",
        "total": "123.45",
        "currency": "USD",
        "items": [{"name": "Widget", "quantity": 2, "price": "49.90"}],
    }
    body.update(overrides)
    return body


# --- the minimal stack's checks and email --------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{", "body"),
        (b"[1]", "body"),
        (order(id="7"), "id"),
        (order(id=0), "id"),
        (order(email="a@example.com\r\nBcc: victim@example.com"), "email"),
        (order(email="Someone <a@example.com>"), "email"),
        (order(currency="US"), "currency"),
        (order(total=12.5), "total"),
        (order(total="lots"), "total"),
        (order(items=[]), "items"),
        (order(items=[{"name": "x", "quantity": 0, "price": "1.00"}]), "quantity"),
        (order(items=[{"name": "x", "quantity": 1, "price": 1}]), "price"),
    ],
)
def test_minimal_refuses_a_bad_order_naming_the_field(body: Any, field: str) -> None:
    raw = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    with pytest.raises(InvalidOrder, match=field):
        parse_order(raw)


def test_minimal_email_is_one_the_case_matches_and_keeps_names_on_one_line() -> None:
    body = order(42, items=[{"name": "Evil\r\nBcc: x@example.com", "quantity": 1, "price": "1"}])
    data = render(parse_order(httpx.Request("POST", "/", json=body).content))
    head, text = data.split(b"\r\n\r\n", 1)
    match = _MESSAGE_ID.search(head)
    assert match is not None
    assert int(match.group(1)) == 42
    assert b"\r\nTo: customer42@example.com\r\n" in head
    assert b"\r\nBcc:" not in data
    assert b"Evil Bcc: x@example.com" in text


# --- the SMTP pool both peers send on -------------------------------------------------


async def _send_on_a_broken_connection(pool: SmtpPool, data: bytes) -> None:
    async with pool.connection() as smtp:
        smtp.close()
        await smtp.sendmail(MAIL_FROM, ["customer1@example.com"], data)


async def test_the_peers_pool_sends_on_its_connections_and_reconnects_a_broken_one() -> None:
    handler = CountingHandler()
    server = SmtpServer(handler, host="127.0.0.1", port=0)
    await server.start()
    pool = SmtpPool("127.0.0.1", server.port, size=2)
    try:
        await pool.open()
        data = render(parse_order(httpx.Request("POST", "/", json=order(1)).content))
        async with pool.connection() as smtp:
            await smtp.sendmail(MAIL_FROM, ["customer1@example.com"], data)
            smtp.close()  # the connection breaks after its email
        # The other one breaks during a send: the error goes out.
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await _send_on_a_broken_connection(pool, data)
        # Both connections, the broken one connected again, send the next emails.
        for order_id in (2, 3, 4):
            body = httpx.Request("POST", "/", json=order(order_id)).content
            async with pool.connection() as smtp:
                await smtp.sendmail(
                    MAIL_FROM, [f"customer{order_id}@example.com"], render(parse_order(body))
                )
        assert sorted(handler.by_order) == [1, 2, 3, 4]
        assert pool.idle.qsize() == 2
    finally:
        await pool.close()
        await server.stop()


# --- the report's comparison ------------------------------------------------------------


def _figures(ours: float, minimal: float, faststream: float) -> dict[tuple[str, str], Figure]:
    def saturation(name: str, value: float) -> Figure:
        extra = {WORKERS: 2.0, CPU_PER_EMAIL: 1000.0}
        return Figure("end to end", name, value, "emails/s", "", extra)

    def latency(name: str, p99: float) -> Figure:
        return Figure("end to end", name, p99, "ms", "", {"p50": p99 / 2, "rate": 100.0})

    rows = [
        saturation(SATURATION.format(n=2, s="s"), ours),
        # orderflow's 1-worker row must not be the one a 2-consumer peer is compared with.
        saturation(SATURATION.format(n=1, s=""), ours / 4),
        saturation(PEER_SATURATION.format(peer=PEERS["minimal"], n=2), minimal),
        saturation(PEER_SATURATION.format(peer=PEERS["faststream"], n=2), faststream),
        latency(LATENCY, 60.0),
        latency(PEER_LATENCY.format(peer=PEERS["minimal"]), 30.0),
    ]
    return {(f.case, f.contender): f for f in rows}


def _target(name: str) -> report.Target:
    return next(t for t in report.TARGETS if t.name == name)


def test_report_compares_orderflow_with_each_peer_at_the_same_worker_count() -> None:
    figures = _figures(ours=600.0, minimal=800.0, faststream=100.0)
    faststream = _target("end to end vs FastStream stack (case 3)").measure(figures)
    minimal = _target("end to end vs minimal stack (case 3)").measure(figures)
    p99 = _target("end to end p99 at half saturation vs minimal stack (case 3)").measure(figures)
    assert faststream is not None
    assert minimal is not None
    assert p99 is not None
    assert faststream[0] == pytest.approx(6.0)
    assert minimal[0] == pytest.approx(0.75)
    assert p99[0] == pytest.approx(2.0)


def test_report_leaves_a_peer_that_did_not_run_unmeasured() -> None:
    figures = _figures(ours=600.0, minimal=800.0, faststream=math.nan)
    assert _target("end to end vs FastStream stack (case 3)").measure(figures) is None


def test_report_renders_the_peers_table_ratios_first() -> None:
    figures = list(_figures(ours=600.0, minimal=800.0, faststream=100.0).values())
    lines: list[str] = []
    report._versus_peers(lines.append, figures)
    header = lines[0].split("|")
    assert header[2].strip() == "orderflow ÷ it, emails/s"
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines[2:] if line}
    assert rows[PEER_SATURATION.format(peer=PEERS["faststream"], n=2)][2].strip() == "6.00×"
    assert rows[PEER_SATURATION.format(peer=PEERS["minimal"], n=2)][3].strip() == "2.00×"


# --- each peer, started as the case starts it ----------------------------------------


def _mails(mail_dir: Path) -> dict[int, bytes]:
    new = mail_dir / "new"
    found: dict[int, bytes] = {}
    for entry in os.scandir(new) if new.exists() else ():
        data = Path(entry.path).read_bytes()
        match = _MESSAGE_ID.search(data)
        if match:
            found[int(match.group(1))] = data
    return found


@pytest.mark.slow
@pytest.mark.parametrize("peer", list(PEERS))
async def test_peer_takes_an_order_and_emails_it_once(peer: str, tmp_path: Path) -> None:
    if peer == "faststream" and importlib.util.find_spec("faststream") is None:
        pytest.skip("FastStream is in the bench extra: make .venv/.installed-bench")
    stack = await peers_stack.start(peer, tmp_path, consumers=1)
    pids = list(stack.pids().values())
    try:
        async with httpx.AsyncClient(base_url=stack.api_url) as client:
            created = await client.post("/orders", json=order(7))
            assert created.status_code == 201, created.text
            mails = await wait_until(lambda: _mails(stack.mail_dir), what="the email")
            assert list(mails) == [7]
            assert b"To: customer7@example.com" in mails[7]
            assert b"Total: 123.45 USD" in mails[7]

            again = await client.post("/orders", json=order(7))
            assert again.status_code == 409, again.text
            refused = await client.post("/orders", json=order(8, email="not an address"))
            assert refused.status_code == 422
            assert "email" in refused.text
            # A later order is emailed; the refused and the repeated ones never are.
            assert (await client.post("/orders", json=order(9))).status_code == 201
            await wait_until(lambda: 9 in _mails(stack.mail_dir), what="order 9's email")
            assert sorted(_mails(stack.mail_dir)) == [7, 9]
    finally:
        await stack.stop()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
