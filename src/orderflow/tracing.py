"""OpenTelemetry tracing: one W3C trace per order, from the HTTP request to the SMTP server.

Configured only by OpenTelemetry's own variables (``OTEL_SERVICE_NAME``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_TRACES_EXPORTER``,
``OTEL_TRACES_SAMPLER``, ``OTEL_SDK_DISABLED``). With no exporter configured tracing is
off: :func:`setup` installs nothing, :data:`enabled` stays False, and every hook here
costs its caller one boolean check (no span objects). The CLI calls :func:`setup` at
process start; nothing happens at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from orderflow.bus import tracing as bus_tracing
from orderflow.bus.tracing import (
    TRACE_FIELDS,
    attribute,
    consuming,
    event,
    failed,
    headers,
    headers_of,
    publishing,
    span,
)

__all__ = [
    "ORDER_ID",
    "TRACE_FIELDS",
    "asgi",
    "attribute",
    "consuming",
    "event",
    "exporter_names",
    "failed",
    "headers",
    "headers_of",
    "publishing",
    "remember_request",
    "request_trace",
    "setup",
    "shutdown",
    "span",
]

log = logging.getLogger(__name__)

#: The span attribute naming the order a span worked for.
ORDER_ID = "orderflow.order.id"
#: Whether spans are recorded and exported in this process (set by :func:`setup`).
enabled = False
#: The trace context of orders being placed, by ``id()`` of their request (see
#: :func:`remember_request`): read by the outbox in the database thread.
_request_traces: dict[int, dict[str, str]] = {}


def exporter_names() -> list[str]:
    """The span exporters the environment asks for; empty means tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        # OpenTelemetry's default exporter is otlp; here it takes an endpoint to be on.
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    return [n for n in chosen if n != "none"]


def setup(service_name: str) -> bool:
    """Install the SDK if an exporter is configured; ``service_name`` unless
    ``OTEL_SERVICE_NAME`` says otherwise. Returns whether tracing is on."""
    global enabled
    names = exporter_names()
    if not names or enabled:
        return enabled
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    # The sampler comes from OTEL_TRACES_SAMPLER (the SDK reads it); the provider
    # flushes its spans at exit.
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    bus_tracing.activate(trace.get_tracer("orderflow"))
    enabled = True
    log.info("tracing on: exporting spans with %s", ", ".join(names))
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console, none)")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the otlp-grpc extra: "
                "pip install 'orderflow[otlp-grpc]'"
            ) from None
        return OTLPSpanExporter()
    if protocol != "http/protobuf":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported {protocol!r} (http/protobuf or grpc)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def shutdown() -> None:
    """Export what is buffered and stop (also done at exit by the SDK)."""
    if enabled:
        from opentelemetry import trace

        provider: Any = trace.get_tracer_provider()
        provider.shutdown()


def asgi(app: Any) -> Any:
    """``app`` behind OpenTelemetry's ASGI middleware (a SERVER span per request,
    continuing an incoming ``traceparent``)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, excluded_urls="health,metrics")


# -- orders being placed ----------------------------------------------------------


@contextlib.contextmanager
def remember_request(request: object) -> Iterator[None]:
    """While placing ``request``, keep the current trace context for its outbox row
    (the order is written by a shared transaction in another thread)."""
    if not enabled:
        yield
        return
    key = id(request)
    _request_traces[key] = headers()
    try:
        yield
    finally:
        _request_traces.pop(key, None)


def request_trace(request: object) -> dict[str, str] | None:
    """The trace context :func:`remember_request` kept for ``request``, if any."""
    if not _request_traces:
        return None
    return _request_traces.get(id(request)) or None
