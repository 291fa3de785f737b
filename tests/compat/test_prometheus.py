"""prometheus.bulk_observe: counting in bulk gives what observe() per value gives."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from orderflow._compat import prometheus as compat_prometheus
from orderflow._compat.prometheus import BulkObserver

BUCKETS = (0.001, 0.01, 0.1, 1.0)
#: Values inside buckets, exactly on bounds (le is inclusive), past the last bound.
VALUES = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.5, 1.0, 7.5, 0.001, 0.2]


def _samples(bulk: bool | None) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", ["stream"], buckets=BUCKETS, registry=registry)
    observer = BulkObserver(histogram.labels("s"), bulk=bulk)
    for value in VALUES[:5]:
        observer.observe(value)
    observer.flush()
    for value in VALUES[5:]:
        observer.observe(value)
    observer.flush()
    observer.flush()  # nothing new: nothing added
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def test_bulk_and_per_value_observations_give_the_same_histogram() -> None:
    expected = _samples(bulk=False)
    assert expected[("h_seconds_count", "")] == len(VALUES)
    assert expected[("h_seconds_sum", "")] == pytest.approx(sum(VALUES))
    assert expected[("h_seconds_bucket", "0.001")] == 4  # cumulative: 0, 0.0005, 0.001 twice
    if compat_prometheus.BULK_OBSERVE.enabled:
        assert _samples(bulk=True) == pytest.approx(expected)
    assert _samples(bulk=None) == pytest.approx(expected)


def test_the_fallback_observes_at_once() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", buckets=BUCKETS, registry=registry)
    BulkObserver(histogram, bulk=False).observe(0.5)
    assert registry.get_sample_value("h_seconds_count") == 1
