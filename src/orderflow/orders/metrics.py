"""Prometheus metrics of the Order Service (objects only; ``/metrics`` serves them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ORDERS_CREATED = Counter("orderflow_orders_created_total", "Orders accepted and stored.")
ORDER_REPLAYS = Counter(
    "orderflow_order_replays_total", "Requests answered with an existing order (idempotency)."
)
ORDERS_REJECTED = Counter("orderflow_orders_rejected_total", "Order requests refused.", ["reason"])
OUTBOX_BACKLOG = Gauge(
    "orderflow_outbox_backlog", "Events waiting in the outbox.", multiprocess_mode="mostrecent"
)
OUTBOX_RELAYED = Counter(
    "orderflow_outbox_relayed_total", "Outbox events published and removed by the relay."
)
ORDERS_REPUBLISHED = Counter(
    "orderflow_orders_republished_total",
    "Pending orders queued again by reconciliation.",
)
EMAIL_STATUS = Counter(
    "orderflow_email_status_total", "Email outcomes recorded on orders.", ["status", "outcome"]
)
