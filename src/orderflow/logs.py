"""Log set-up: every line written while handling an order names its trace and order.

``ORDERFLOW_LOG_FORMAT=json`` writes one JSON object per line (time, level, logger,
message, trace_id, span_id, order_id); the default is text, with ``trace_id=…
order_id=…`` appended when known.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson

#: The order being handled in this task (None outside one).
ORDER_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "orderflow_order_id", default=None
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
FORMATS = ("text", "json")


@contextlib.contextmanager
def order_context(order_id: int | None) -> Iterator[None]:
    """Log lines written inside name ``order_id``."""
    token = ORDER_ID.set(order_id)
    try:
        yield
    finally:
        ORDER_ID.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``trace_id``, ``span_id``, ``order_id`` and ``context`` (their text) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        from orderflow import tracing

        trace_id = span_id = None
        if tracing.enabled:
            from opentelemetry import trace

            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                trace_id, span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        order_id = ORDER_ID.get()
        record.trace_id, record.span_id, record.order_id = trace_id, span_id, order_id
        parts = []
        if trace_id is not None:
            parts.append(f"trace_id={trace_id}")
        if order_id is not None:
            parts.append(f"order_id={order_id}")
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON (the traceback, if any, in ``exc_info``)."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
            "order_id": getattr(record, "order_id", None),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(level: str) -> None:
    """Log to stderr at ``level``, in ``ORDERFLOW_LOG_FORMAT`` (text or json)."""
    fmt = os.environ.get("ORDERFLOW_LOG_FORMAT", "text").strip().lower() or "text"
    if fmt not in FORMATS:
        raise ValueError(f"ORDERFLOW_LOG_FORMAT must be text or json, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
