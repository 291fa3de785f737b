"""Messaging spans (OpenTelemetry's messaging conventions) for the bus's consumers and
publishers, and the W3C trace-context fields a stream entry carries.

Inactive until ``orderflow.tracing.setup`` installs a tracer (:func:`activate`); while
inactive :data:`enabled` is False and callers check it before anything here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

#: Whether spans are recorded in this process (set by :func:`activate`).
enabled = False
#: The W3C trace-context fields a stream entry (or outbox row) carries.
TRACE_FIELDS = ("traceparent", "tracestate")

_tracer: Any = None
_NULL = contextlib.nullcontext()


def activate(tracer: Any) -> None:
    """Record spans with ``tracer`` from now on."""
    global enabled, _tracer
    _tracer = tracer
    enabled = True


def span(
    name: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """An INTERNAL child span of the current one; a shared no-op when tracing is off."""
    if not enabled:
        return _NULL
    started: contextlib.AbstractContextManager[Any] = _tracer.start_as_current_span(
        name, attributes=attributes
    )
    return started


def event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Add an event to the current span (tracing on only)."""
    if enabled:
        from opentelemetry import trace

        trace.get_current_span().add_event(name, attributes=attributes)


def attribute(key: str, value: Any) -> None:
    """Set an attribute on the current span (tracing on only)."""
    if enabled:
        from opentelemetry import trace

        trace.get_current_span().set_attribute(key, value)


def failed(exc: BaseException) -> None:
    """Mark the current span failed by ``exc`` (tracing on only)."""
    if enabled:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        current = trace.get_current_span()
        current.record_exception(exc)
        current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def headers() -> dict[str, str]:
    """The current trace context as W3C fields (``traceparent``, maybe ``tracestate``);
    empty when tracing is off or no span is current."""
    if not enabled:
        return {}
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_FIELDS}


def _parent(fields: Mapping[str, str] | None) -> Any:
    """The context of ``fields``' traceparent, or an empty one (a new trace)."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not fields or "traceparent" not in fields:
        return Context()
    return TraceContextTextMapPropagator().extract(
        {k: fields[k] for k in TRACE_FIELDS if k in fields}
    )


@contextlib.contextmanager
def consuming(
    headers: Mapping[str, str],
    *,
    stream: str,
    group: str,
    consumer: str,
    entry_id: str,
    message_id: str,
    deliveries: int,
    claimed: bool,
) -> Iterator[Any]:
    """The CONSUMER span of one delivery (messaging semantic conventions), continuing
    the entry's ``traceparent`` or starting a trace."""
    from opentelemetry.trace import SpanKind

    attributes = {
        "messaging.system": "redis",
        "messaging.destination.name": stream,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": message_id,
        "messaging.consumer.group.name": group,
        "messaging.redis.consumer.name": consumer,
        "messaging.redis.entry.id": entry_id,
        "messaging.redis.message.delivery_count": deliveries,
    }
    with _tracer.start_as_current_span(
        f"process {stream}",
        context=_parent(headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as current:
        if claimed:
            current.add_event("claimed", {"messaging.redis.message.delivery_count": deliveries})
        elif deliveries > 1:
            current.add_event("redelivered", {"messaging.redis.message.delivery_count": deliveries})
        yield current


def publishing(stream: str, message_id: str, trace: Mapping[str, str] | None) -> Any:
    """A started PRODUCER span ``send <stream>`` under ``trace`` (not current; the
    caller ends it)."""
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(
        f"send {stream}",
        context=_parent(trace),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "redis",
            "messaging.destination.name": stream,
            "messaging.operation.type": "send",
            "messaging.operation.name": "xadd",
            "messaging.message.id": message_id,
        },
    )


def headers_of(span: Any) -> dict[str, str]:
    """``span``'s context as W3C fields."""
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    return {k: v for k, v in carrier.items() if k in TRACE_FIELDS}
