"""Prometheus metrics of the Email Service (objects only: nothing is served here)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SENT = Counter("orderflow_emails_sent_total", "Confirmation emails accepted by SMTP.")
FAILED = Counter(
    "orderflow_emails_failed_total",
    "Orders whose email failed for good (invalid order, rejected, gave up).",
    ["reason"],
)
DUPLICATES = Counter(
    "orderflow_emails_duplicates_skipped_total",
    "Deliveries of an order whose email was already sent: acknowledged, not sent again.",
)
DEFERRED = Counter(
    "orderflow_emails_deferred_total", "Sends that failed transiently and will be retried."
)
SEND_SECONDS = Histogram(
    "orderflow_email_send_seconds",
    "Time one SMTP send took, successful or not.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SMTP_REACHABLE = Gauge(
    "orderflow_email_smtp_reachable",
    "1 while the SMTP server answers; 0 while sends are held (consumption paused) until it does.",
)
SMTP_REACHABLE.set(1)
SMTP_CONCURRENCY_LIMIT = Gauge(
    "orderflow_email_smtp_concurrency_limit",
    "SMTP transactions this worker allows in flight at once at the destination (adaptive).",
    ["destination"],
)
