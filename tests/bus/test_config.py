"""WorkerConfig from the application's settings: the one place the delivery policy is read."""

from __future__ import annotations

import dataclasses

import pytest

from orderflow.bus import WorkerConfig
from orderflow.bus.consume.config import WorkerStats, sum_stats
from orderflow.config import Settings


def test_a_config_from_settings_takes_the_whole_delivery_policy() -> None:
    settings = Settings(
        claim_idle_ms=1500, max_deliveries=3, dlq_maxlen=77, retry_base_ms=40, retry_max_ms=900
    )
    config = WorkerConfig.from_settings(settings, stream="orders", group="g", concurrency=2)
    assert (config.stream, config.group, config.concurrency) == ("orders", "g", 2)
    assert config.claim_idle_ms == 1500
    assert config.max_deliveries == 3
    assert config.dlq_maxlen == 77
    assert (config.retry_base_ms, config.retry_max_ms) == (40, 900)


def test_options_override_the_settings() -> None:
    settings = Settings(retry_base_ms=40, retry_max_ms=900)
    config = WorkerConfig.from_settings(
        settings, stream="orders", group="g", retry_base_ms=5, retry_max_ms=20
    )
    assert (config.retry_base_ms, config.retry_max_ms) == (5, 20)


def test_a_retry_maximum_below_the_base_is_refused_not_raised() -> None:
    settings = Settings(retry_base_ms=5000, retry_max_ms=1000)
    with pytest.raises(ValueError, match="must be at least retry_base_ms"):
        WorkerConfig.from_settings(settings, stream="orders", group="g")


def test_an_unset_retry_maximum_is_30_s_or_the_base_when_longer() -> None:
    assert WorkerConfig("orders", "g", retry_base_ms=100).retry_cap_ms == 30_000
    assert WorkerConfig("orders", "g", retry_base_ms=60_000).retry_cap_ms == 60_000


def test_the_stats_of_several_workers_add_up_field_by_field() -> None:
    # The partitioned, ordered and supervised workers report these sums.
    names = [f.name for f in dataclasses.fields(WorkerStats)]
    parts = [WorkerStats(**{n: i + 1 for i, n in enumerate(names)}) for _ in range(3)]
    parts.append(WorkerStats(**{n: 100 * (i + 1) for i, n in enumerate(names)}))
    total = sum_stats(parts)
    assert dataclasses.asdict(total) == {n: 103 * (i + 1) for i, n in enumerate(names)}
    assert sum_stats([]) == WorkerStats()
