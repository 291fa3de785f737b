"""Prometheus metrics of the bus (objects only: nothing is served or connected here)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

#: How a gauge read from Redis at scrape time combines across the processes of one
#: ``orders serve --workers N`` (Prometheus multiprocess mode): the latest reading.
SCRAPED: Final = "mostrecent"

PUBLISHED = Counter("orderflow_published_total", "Entries appended to a stream.", ["stream"])
CONSUMED = Counter(
    "orderflow_consumed_total", "Deliveries handed to a handler.", ["stream", "group"]
)
ACKED = Counter("orderflow_acked_total", "Entries acknowledged.", ["stream", "group"])
RETRIED = Counter(
    "orderflow_retried_total", "Failed deliveries scheduled for a retry.", ["stream", "group"]
)
DEAD_LETTERED = Counter(
    "orderflow_dead_lettered_total", "Entries moved to the dead-letter stream.", ["stream", "group"]
)
CLAIMED = Counter(
    "orderflow_claimed_total", "Idle entries claimed from other consumers.", ["stream", "group"]
)
HANDLER_SECONDS = Histogram(
    "orderflow_handler_seconds",
    "Time a handler took per delivery.",
    ["stream", "group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STREAM_OVER_CAP = Gauge(
    "orderflow_stream_over_cap",
    "1 when a lagging consumer group keeps a stream over its length cap.",
    ["stream"],
    multiprocess_mode="max",
)
REDIS_ERRORS = Counter(
    "orderflow_redis_errors_total", "Redis connection errors survived.", ["component"]
)
GROUP_LAG = Gauge(
    "orderflow_group_lag",
    "Entries of a stream not yet delivered to a consumer group (at the last scrape).",
    ["stream", "group"],
    multiprocess_mode=SCRAPED,
)
GROUP_PENDING = Gauge(
    "orderflow_group_pending",
    "Entries delivered to a group but not acknowledged (at the last scrape).",
    ["stream", "group"],
    multiprocess_mode=SCRAPED,
)
GROUP_OLDEST_PENDING_SECONDS = Gauge(
    "orderflow_group_oldest_pending_age_seconds",
    "Age of a group's oldest unacknowledged entry (at the last scrape).",
    ["stream", "group"],
    multiprocess_mode=SCRAPED,
)
DEAD_LETTERS = Gauge(
    "orderflow_dead_letters",
    "Entries in a stream's dead-letter stream.",
    ["stream"],
    multiprocess_mode=SCRAPED,
)
STREAM_LENGTH = Gauge(
    "orderflow_stream_length",
    "Entries retained in a stream.",
    ["stream"],
    multiprocess_mode=SCRAPED,
)
