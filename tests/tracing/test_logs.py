"""Log lines name the trace and the order they were written for, as text or JSON."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider

from orderflow import logs, tracing
from tests.email.conftest import SmtpFixture, start_cli
from tests.support import wait_until
from tests.tracing.receiver import Receiver
from tests.tracing.test_trace import _env


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.StreamHandler[io.StringIO]]:
    """A logger whose lines go to a buffer, in the format ORDERFLOW_LOG_FORMAT names."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("tests.tracing.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    monkeypatch.setattr(tracing, "enabled", True)
    yield handler
    logger.removeHandler(handler)


def _in_a_span(message: str) -> tuple[str, str]:
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("tests.tracing.captured")
    with tracer.start_as_current_span("handling") as span, logs.order_context(4242):
        log.warning(message, 9)
        ctx = span.get_span_context()
    log.warning("outside")
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_text_lines_name_the_trace_and_the_order(
    captured: logging.StreamHandler[io.StringIO],
) -> None:
    captured.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    trace_id, _ = _in_a_span("took %ds")
    inside, outside = captured.stream.getvalue().splitlines()
    assert inside.endswith(f"took 9s [trace_id={trace_id} order_id=4242]")
    assert outside.endswith("outside")


def test_json_lines_are_one_object_each_with_trace_span_and_order(
    captured: logging.StreamHandler[io.StringIO],
) -> None:
    captured.setFormatter(logs.JsonFormatter())
    trace_id, span_id = _in_a_span("took %ds")
    inside, outside = map(orjson.loads, captured.stream.getvalue().splitlines())
    assert inside["message"] == "took 9s"
    assert inside["level"] == "WARNING"
    assert inside["logger"] == "tests.tracing.captured"
    assert (inside["trace_id"], inside["span_id"], inside["order_id"]) == (
        trace_id,
        span_id,
        4242,
    )
    assert inside["time"].endswith("+00:00")
    assert (outside["trace_id"], outside["order_id"]) == (None, None)


def test_an_unknown_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERFLOW_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="ORDERFLOW_LOG_FORMAT must be text or json"):
        logs.configure("INFO")


@pytest.mark.slow
async def test_a_worker_writes_json_lines_naming_the_order_and_its_trace(
    redis_url: str,
    smtp: SmtpFixture,
    tmp_path: Path,
    receiver: Receiver,
    processes: list[asyncio.subprocess.Process],
) -> None:
    smtp.handler.rcpt_reply = "550 no such user"
    env = {**_env(redis_url, smtp.url, tmp_path, receiver), "ORDERFLOW_LOG_FORMAT": "json"}
    log_path = tmp_path / "worker.log"
    await start_cli(processes, ["email", "worker", "--name", "w1"], env, log_path)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd("orders", {"data": b'{"id":77,"email":"a@example.com","total":1}'})
    finally:
        await client.aclose()

    def failed_line() -> list[dict[str, object]]:
        lines = [orjson.loads(line) for line in log_path.read_text().splitlines() if line]
        return [e for e in lines if "email failed" in str(e["message"])]

    (line,) = await wait_until(failed_line, what="the failure's log line")
    assert line["order_id"] == 77
    (delivery,) = await wait_until(
        lambda: [s for s in receiver.spans if s.name == "process orders"], what="the span"
    )
    assert line["trace_id"] == delivery.trace_id
