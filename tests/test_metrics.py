"""Group lag and dead letters as Prometheus gauges, read from Redis at scrape time."""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from orderflow.bus import Message, StreamPublisher, ensure_group
from orderflow.bus.admin import record_stream_metrics


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_stream_gauges_follow_what_redis_reports(aredis: aioredis.Redis) -> None:
    await ensure_group(aredis, "orders", "email-service")
    await StreamPublisher(aredis).publish_many(
        "orders", [Message(data={"n": n}) for n in range(10)]
    )
    await aredis.xreadgroup("email-service", "c1", {"orders": ">"}, count=4)
    await aredis.xadd("orders:dlq", {"data": "{}"})

    await record_stream_metrics(aredis, ["orders"])

    labels = {"stream": "orders", "group": "email-service"}
    assert gauge("orderflow_group_lag", **labels) == 6
    assert gauge("orderflow_group_pending", **labels) == 4
    assert gauge("orderflow_stream_length", stream="orders") == 10
    assert gauge("orderflow_dead_letters", stream="orders") == 1
    age = gauge("orderflow_group_oldest_pending_age_seconds", **labels)
    assert age is not None
    assert 0 <= age < 60
