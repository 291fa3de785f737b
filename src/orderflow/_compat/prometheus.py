"""prometheus_client internals: adding many histogram observations at once.

prometheus_client has no bulk observe, and ``Histogram.observe`` takes a lock per
value it touches: per delivery, that cost as much as a no-op handler. The fast path
counts observations per bucket in plain Python and adds each bucket's count (and the
sum) to the histogram's values in one call per bucket, as ``observe()`` would, at flush.
The fallback calls the public ``observe()`` once per value: the same counts and sum.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

from orderflow._compat import decide

#: Written against prometheus_client 0.26 (``_upper_bounds``, ``_buckets``, ``_sum``).
TESTED = ((0, 20), (0, 27))
BULK_OBSERVE = decide("prometheus.bulk_observe", "prometheus-client", TESTED)


class BulkObserver:
    """Observations of one histogram (a labelled child), added to it by :meth:`flush`.

    ``observe`` is the hot path: a bisect and an addition on the fast path, the
    histogram's own ``observe`` on the fallback (``flush`` then has nothing to do).
    """

    __slots__ = ("_bounds", "_buckets", "_histogram", "_total", "observe")

    def __init__(self, histogram: Histogram, *, bulk: bool | None = None) -> None:
        self._histogram = histogram
        self._total = 0.0
        self.observe: Callable[[float], None]
        if BULK_OBSERVE.enabled if bulk is None else bulk:
            internal: Any = histogram
            self._bounds: tuple[float, ...] = tuple(internal._upper_bounds)
            self._buckets = [0] * len(self._bounds)
            self.observe = self._count
        else:
            self._bounds = ()
            self._buckets = []
            self.observe = histogram.observe

    def _count(self, seconds: float) -> None:
        self._buckets[bisect_left(self._bounds, seconds)] += 1
        self._total += seconds

    def flush(self) -> None:
        """Add what was counted since the last flush to the histogram."""
        buckets = self._buckets
        if not any(buckets):
            return
        # As Histogram.observe does, per bucket instead of per value: the bucket a value
        # falls in (le is inclusive, as bisect_left finds it) and the sum.
        internal: Any = self._histogram
        internal._sum.inc(self._total)
        for i, count in enumerate(buckets):
            if count:
                internal._buckets[i].inc(count)
                buckets[i] = 0
        self._total = 0.0
