"""The adaptive SMTP concurrency limit: pure logic with a fake clock, and its permits."""

from __future__ import annotations

import asyncio

import pytest

from orderflow.email.concurrency import (
    AdaptiveLimit,
    ConcurrencyLimiter,
    FixedLimit,
    LimitChange,
)


class Clock:
    """Time that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(
    limit: AdaptiveLimit, rtt_s: float, clock: Clock, *, in_flight: int | None = None
) -> None:
    """One full window of replies taking ``rtt_s`` each, the limit fully used."""
    samples = max(limit.limit, limit.min_samples)
    used = limit.limit if in_flight is None else in_flight
    for _ in range(samples):
        clock.now += rtt_s / max(limit.limit, 1)
        limit.succeeded(rtt_s, used, clock.now)


def test_slow_start_doubles_to_the_maximum_while_replies_stay_flat() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32)
    seen = [limit.limit]
    while limit.limit < 32:
        window(limit, 0.001, clock)
        seen.append(limit.limit)
    assert seen == [1, 2, 4, 8, 16, 32]
    assert limit.slow_start
    window(limit, 0.001, clock)
    assert limit.limit == 32, "never above the maximum"


def test_a_queue_shrinks_the_limit_to_what_the_server_serves_plus_alpha() -> None:
    """Vegas: ``queue = limit * (1 - baseline / median)``; above beta the limit becomes
    ``limit - queue + alpha``, at most halved per window."""
    clock = Clock()
    limit = AdaptiveLimit(32, initial=8, alpha=0.5, beta=1.0)
    window(limit, 0.004, clock)  # slow start: 16, baseline 4 ms
    assert limit.limit == 16
    window(limit, 0.005, clock)  # queue 16 * 0.2 = 3.2: 16 - 3.2 + 0.5 = 13.3
    assert limit.limit == 13
    assert not limit.slow_start
    window(limit, 0.040, clock)  # queue 13.3 * 0.9 = 12: at most halved
    assert limit.limit == 6


def test_slow_start_ends_without_shrinking_when_a_small_queue_shows() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32, initial=4, alpha=0.5, beta=1.0)
    window(limit, 0.004, clock)  # 8
    window(limit, 0.0045, clock)  # queue 8 * (1 - 4/4.5) = 0.89: between alpha and beta
    assert limit.limit == 8
    assert not limit.slow_start
    window(limit, 0.0045, clock)
    assert limit.limit == 8, "holds while the queue is between alpha and beta"


def test_after_slow_start_it_grows_by_one_per_window() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32, initial=8)
    window(limit, 0.004, clock)  # 16
    window(limit, 0.008, clock)  # queue 8: halved to 8
    assert limit.limit == 8
    grown = []
    for _ in range(3):
        window(limit, 0.004, clock)
        grown.append(limit.limit)
    assert grown == [9, 10, 11]


def test_one_in_flight_can_always_try_two() -> None:
    """At a limit of one the queue estimate stays below one: a server that got faster
    is found again."""
    clock = Clock()
    limit = AdaptiveLimit(8, initial=2)
    window(limit, 0.010, clock)  # 4
    window(limit, 0.100, clock)  # 2
    window(limit, 0.100, clock)  # 1
    assert limit.limit == 1
    window(limit, 0.011, clock)
    assert limit.limit == 2


def test_a_slow_round_trip_our_own_event_loop_explains_is_not_a_queue() -> None:
    """A busy worker reads its replies late: with the loop 10 ms late on average, a
    40 ms round trip (4 waits) is the worker's own doing, and the limit keeps growing."""
    clock = Clock()
    limit = AdaptiveLimit(32, initial=4, own_factor=4.0)
    window(limit, 0.001, clock)  # 8, baseline 1 ms
    for _ in range(3):
        limit.lagged(0.010)
    window(limit, 0.040, clock)
    assert limit.limit == 16
    for _ in range(3):
        limit.lagged(0.001)
    window(limit, 0.040, clock)  # the same round trip with an idle loop: a queue
    assert limit.limit == 8


def test_the_median_ignores_one_slow_reply() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32, initial=8)
    window(limit, 0.002, clock)  # 16, baseline 2 ms
    for n in range(16):
        clock.now += 0.001
        limit.succeeded(0.5 if n == 0 else 0.002, 16, clock.now)
    assert limit.limit == 32


def test_it_does_not_grow_while_the_limit_is_not_used() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32, initial=8)
    window(limit, 0.002, clock, in_flight=3)
    assert limit.limit == 8, "3 in flight of 8 says nothing about 16"
    window(limit, 0.002, clock, in_flight=5)
    assert limit.limit == 16


def test_an_unused_limit_still_shrinks_on_a_queue() -> None:
    clock = Clock()
    limit = AdaptiveLimit(32, initial=8)
    window(limit, 0.002, clock, in_flight=2)
    window(limit, 0.010, clock, in_flight=2)
    assert limit.limit == 4


def test_the_baseline_forgets_windows_older_than_baseline_s() -> None:
    clock = Clock()
    limit = AdaptiveLimit(8, initial=8, baseline_s=10.0)
    window(limit, 0.001, clock)
    assert limit.baseline == 0.001
    clock.now += 5
    window(limit, 0.0015, clock)
    assert limit.baseline == 0.001
    clock.now += 6
    window(limit, 0.0015, clock)
    assert limit.baseline == 0.0015, "the 1 ms window is 11 s old"


def test_a_server_slower_for_good_becomes_the_new_baseline() -> None:
    """Once the fast windows are forgotten, the slower server is the baseline and the
    limit grows again (the limit shrank to the minimum meanwhile)."""
    clock = Clock()
    limit = AdaptiveLimit(16, initial=16, baseline_s=1.0)
    window(limit, 0.001, clock)
    window(limit, 0.010, clock)
    assert limit.limit == 8
    while limit.baseline != 0.010:
        window(limit, 0.010, clock)
    assert 1.0 < clock.now < 1.1
    before = limit.limit
    assert before < 16
    window(limit, 0.010, clock)
    assert limit.limit == before + 1


def test_a_failed_transaction_halves_the_limit() -> None:
    clock = Clock()
    changes: list[LimitChange] = []
    limit = AdaptiveLimit(32, initial=16, on_change=changes.append)
    limit.dropped(clock.now)
    assert limit.limit == 8
    assert not limit.slow_start
    for _ in range(5):
        limit.dropped(clock.now)
    assert limit.limit == 1, "never below the minimum"
    assert [c.new for c in changes] == [8, 4, 2, 1]
    assert changes[0].reason == "a transaction failed"


def test_changes_are_reported_once_each_with_the_round_trips() -> None:
    clock = Clock()
    changes: list[LimitChange] = []
    limit = AdaptiveLimit(4, on_change=changes.append)
    for _ in range(4):
        window(limit, 0.002, clock)
    window(limit, 0.008, clock)
    assert [(c.old, c.new, c.reason) for c in changes] == [
        (1, 2, "slow start"),
        (2, 4, "slow start"),
        (4, 2, "replies slowed down"),
    ]
    assert changes[-1].rtt_s == 0.008
    assert changes[-1].baseline_s == 0.002


def test_the_minimum_is_kept() -> None:
    clock = Clock()
    limit = AdaptiveLimit(8, minimum=2, initial=2)
    window(limit, 0.001, clock)
    for _ in range(5):
        window(limit, 1.0, clock)
    assert limit.limit == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"maximum": 0, "minimum": 1}, r"maximum \(0\) must be at least minimum \(1\)"),
        ({"maximum": 4, "minimum": 0}, "minimum must be at least 1, got 0"),
        ({"maximum": 4, "initial": 5}, r"initial \(5\) must be between 1 and 4"),
        ({"maximum": 4, "alpha": 0}, r"alpha \(0\) must be positive and at most beta \(1.0\)"),
        ({"maximum": 4, "alpha": 2, "beta": 1}, r"alpha \(2\) must be positive and at most beta"),
        ({"maximum": 4, "own_factor": -1}, "own_factor must not be negative, got -1"),
        ({"maximum": 4, "min_samples": 0}, "min_samples must be at least 1, got 0"),
        ({"maximum": 4, "baseline_s": 0}, "baseline_s must be positive, got 0"),
    ],
)
def test_bad_parameters_are_refused_by_name(options: dict[str, float], message: str) -> None:
    maximum = int(options.pop("maximum"))
    with pytest.raises(ValueError, match=message):
        AdaptiveLimit(maximum, **options)  # type: ignore[arg-type]


def test_a_negative_round_trip_is_refused() -> None:
    with pytest.raises(ValueError, match="rtt_s must not be negative"):
        AdaptiveLimit(4).succeeded(-0.1, 1, 0.0)


def test_the_fixed_limit_never_moves() -> None:
    limit = FixedLimit(16)
    limit.succeeded(10.0, 16, 0.0)
    limit.dropped(0.0)
    assert limit.limit == 16
    with pytest.raises(ValueError, match="maximum must be at least 1"):
        FixedLimit(0)


# -- permits ---------------------------------------------------------------------------


class SetLimit:
    """A limit the test sets by hand, recording what it was told."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.samples: list[tuple[float, int]] = []
        self.drops = 0
        self.lags: list[float] = []

    def succeeded(self, rtt_s: float, in_flight: int, now: float) -> None:
        self.samples.append((rtt_s, in_flight))

    def dropped(self, now: float) -> None:
        self.drops += 1

    def lagged(self, lag_s: float) -> None:
        self.lags.append(lag_s)


async def hold(
    limiter: ConcurrencyLimiter, entered: list[int], release: asyncio.Event, n: int
) -> None:
    async with limiter.permit():
        entered.append(n)
        await release.wait()


async def test_no_more_permits_than_the_limit_and_waiters_in_order() -> None:
    algorithm = SetLimit(2)
    limiter = ConcurrencyLimiter(algorithm)
    entered: list[int] = []
    releases = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(hold(limiter, entered, releases[n], n)) for n in range(5)]
    await asyncio.sleep(0)
    assert entered == [0, 1]
    assert limiter.in_flight == 2
    releases[0].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert entered == [0, 1, 2]
    # The limit grows: the next waiters get in as soon as a permit is given back.
    algorithm.limit = 4
    releases[1].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert entered == [0, 1, 2, 3, 4]
    for release in releases:
        release.set()
    await asyncio.gather(*tasks)
    assert limiter.in_flight == 0


async def test_a_shrunken_limit_lets_nobody_in_until_in_flight_is_below_it() -> None:
    algorithm = SetLimit(3)
    limiter = ConcurrencyLimiter(algorithm)
    entered: list[int] = []
    releases = [asyncio.Event() for _ in range(4)]
    tasks = [asyncio.create_task(hold(limiter, entered, releases[n], n)) for n in range(4)]
    await asyncio.sleep(0)
    assert entered == [0, 1, 2]
    algorithm.limit = 1
    releases[0].set()
    releases[1].set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert entered == [0, 1, 2], "2 still in flight, limit 1"
    releases[2].set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert entered == [0, 1, 2, 3]
    releases[3].set()
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_gives_its_place_on() -> None:
    limiter = ConcurrencyLimiter(SetLimit(1))
    entered: list[int] = []
    releases = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(hold(limiter, entered, releases[n], n)) for n in range(3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    releases[0].set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert entered == [0, 2]
    releases[2].set()
    await asyncio.gather(tasks[0], tasks[2])
    assert tasks[1].cancelled()
    assert limiter.in_flight == 0


async def test_a_waiter_cancelled_after_being_woken_passes_its_turn_on() -> None:
    limiter = ConcurrencyLimiter(SetLimit(1))
    entered: list[int] = []
    releases = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(hold(limiter, entered, releases[n], n)) for n in range(3)]
    await asyncio.sleep(0)
    releases[0].set()
    await asyncio.sleep(0)  # task 0 leaves, wakes task 1 (not yet run)
    tasks[1].cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert entered == [0, 2]
    releases[2].set()
    await asyncio.gather(tasks[0], tasks[2])
    assert limiter.in_flight == 0


async def test_permits_report_round_trips_and_failures() -> None:
    clock = Clock()
    algorithm = SetLimit(4)
    limiter = ConcurrencyLimiter(algorithm, clock=clock)
    async with limiter.permit() as first, limiter.permit() as second:
        assert (first.in_flight, second.in_flight) == (1, 2)
        first.start()
        clock.now += 0.25
        first.succeeded()
        second.dropped()
    assert algorithm.samples == [(0.25, 1)]
    assert algorithm.drops == 1
    async with limiter.permit() as third:
        with pytest.raises(RuntimeError, match="before start"):
            third.succeeded()


async def test_a_permit_released_twice_counts_once() -> None:
    limiter = ConcurrencyLimiter(SetLimit(2))
    first = await limiter.acquire()
    second = await limiter.acquire()
    first.release()
    first.release()
    assert limiter.in_flight == 1
    second.release()
    assert limiter.in_flight == 0
