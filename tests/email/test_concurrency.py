"""The adaptive SMTP concurrency limit: pure logic against simulated servers with a fake
clock, and its permits."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from dataclasses import dataclass, field

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


# -- simulated servers ------------------------------------------------------------------


class Serial:
    """One message at a time, ``service_s`` each, in arrival order."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self._busy_until = 0.0

    def reply_at(self, now: float) -> float:
        self._busy_until = max(now, self._busy_until) + self.service_s
        return self._busy_until


class Parallel:
    """As many at once as sent, ``service_s`` each (a fast server with many processes)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s

    def reply_at(self, now: float) -> float:
        return now + self.service_s


class GroupFsync:
    """The embedded sink: one fsync of ``fsync_s`` at a time, each for every message that
    arrived before it started. A message waits for the fsync in progress, then its own:
    two in flight take twice as long as one for no more throughput, more share one."""

    def __init__(self, fsync_s: float) -> None:
        self.fsync_s = fsync_s
        #: When the fsync in progress ends, and when the next one starts (None: not yet).
        self._running_until = 0.0
        self._next_at: float | None = None

    def reply_at(self, now: float) -> float:
        if self._next_at is not None and now > self._next_at:
            # The waiting group's fsync has started.
            self._running_until, self._next_at = self._next_at + self.fsync_s, None
        if self._next_at is not None:
            return self._next_at + self.fsync_s
        if now >= self._running_until:
            self._running_until = now + self.fsync_s
            return self._running_until
        self._next_at = self._running_until
        return self._next_at + self.fsync_s


class Jittery:
    """A serial server whose service time varies at random (seeded): 0.5 to 3 times
    ``service_s``, as a slow server shared with other work is."""

    def __init__(self, service_s: float, seed: int) -> None:
        self.service_s = service_s
        self._random = random.Random(seed)
        self._busy_until = 0.0

    def reply_at(self, now: float) -> float:
        service = self.service_s * self._random.uniform(0.5, 3.0)
        self._busy_until = max(now, self._busy_until) + service
        return self._busy_until


class Switching:
    """``before`` until ``at`` seconds, then ``after``."""

    def __init__(
        self, before: Serial | Parallel | GroupFsync, after: Serial | Parallel, at: float
    ) -> None:
        self.before, self.after, self.at = before, after, at

    def reply_at(self, now: float) -> float:
        return (self.before if now < self.at else self.after).reply_at(now)


@dataclass
class Run:
    """What a simulated worker saw: the limit over time and the emails sent."""

    limits: list[tuple[float, int]] = field(default_factory=list)
    sent: int = 0

    def mean_limit(self, since: float, until: float) -> float:
        """The limit's time-weighted mean between ``since`` and ``until``."""
        total, last_t, last = 0.0, since, self.limit_at(since)
        for t, value in self.limits:
            if since < t < until:
                total += (t - last_t) * last
                last_t, last = t, value
        return (total + (until - last_t) * last) / (until - since)

    def limit_at(self, t: float) -> int:
        """The limit at time ``t``."""
        value = self.limits[0][1]
        for when, limit in self.limits:
            if when > t:
                break
            value = limit
        return value

    def peak(self, since: float = 0.0) -> int:
        """The highest limit from ``since`` on."""
        return max(self.limit_at(since), *(v for t, v in self.limits if t >= since))


def simulate(
    limit: AdaptiveLimit,
    server: Serial | Parallel | GroupFsync | Switching | Jittery,
    seconds: float,
    *,
    record_s: float = 0.0005,
) -> Run:
    """A worker with an endless backlog sending to ``server`` under ``limit`` for
    ``seconds``: each send keeps its place until ``record_s`` after its reply (the
    Email Service records it), as ``SmtpSender.holding`` does."""
    run = Run(limits=[(0.0, limit.limit)])
    events: list[tuple[float, int, str, float, int]] = []
    in_flight = 0
    order = 0
    now = 0.0

    def fill() -> None:
        nonlocal in_flight, order
        while in_flight < limit.limit:
            in_flight += 1
            order += 1
            heapq.heappush(events, (server.reply_at(now), order, "reply", now, in_flight))

    fill()
    while events and now < seconds:
        now, n, kind, started, in_flight_then = heapq.heappop(events)
        if kind == "reply":
            run.sent += 1
            limit.succeeded(now - started, in_flight_then, now)
            heapq.heappush(events, (now + record_s, n, "release", started, in_flight_then))
        else:
            in_flight -= 1
        if limit.limit != run.limits[-1][1]:
            run.limits.append((now, limit.limit))
        fill()
    return run


# -- the rule against the servers -------------------------------------------------------


def test_a_serial_server_gets_two_in_flight() -> None:
    """One message at a time: a third in flight only queues (the rate stays, the round
    trip grows). The bandwidth-delay floor is two; probes above it are undone."""
    run = simulate(AdaptiveLimit(16), Serial(0.040), 60.0)
    assert run.peak(since=5.0) <= 3, run.limits
    assert run.mean_limit(5.0, 60.0) <= 2.5, run.limits


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_noisy_slow_server_gets_few_in_flight(seed: int) -> None:
    """Lucky windows do not keep a probe: more in flight must beat the best of the
    settled limit's recent windows; fewer need only match their median."""
    run = simulate(AdaptiveLimit(16), Jittery(0.030, seed), 120.0)
    assert run.mean_limit(10.0, 120.0) <= 2.0, run.limits
    assert run.peak(since=10.0) <= 6, run.limits


def test_the_group_fsync_sink_gets_the_whole_pool() -> None:
    """Two in flight take twice as long as one (the fsync in progress, then its own)
    for the same rate, but every further one shares the fsync: the step from one to
    two is no reason to stop. (A delay rule read the step as a queue and stayed at
    two until its baseline expired.)"""
    run = simulate(AdaptiveLimit(16), GroupFsync(0.004), 20.0)
    assert run.limit_at(1.0) >= 12, run.limits
    assert run.mean_limit(1.0, 9.0) >= 13, run.limits
    assert run.mean_limit(1.0, 20.0) >= 13, run.limits


def test_a_parallel_fast_server_gets_the_whole_pool_within_a_second() -> None:
    run = simulate(AdaptiveLimit(16), Parallel(0.001), 10.0)
    assert run.limit_at(1.0) == 16, run.limits
    assert run.mean_limit(1.0, 10.0) >= 14, run.limits


def test_a_server_that_becomes_serial_gets_fewer_in_flight() -> None:
    run = simulate(AdaptiveLimit(16), Switching(Parallel(0.002), Serial(0.040), 10.0), 40.0)
    assert run.limit_at(9.9) >= 12, run.limits
    assert run.mean_limit(25.0, 40.0) <= 3, run.limits


def test_a_server_that_becomes_faster_gets_more_in_flight() -> None:
    run = simulate(AdaptiveLimit(16), Switching(Serial(0.040), Parallel(0.002), 10.0), 30.0)
    assert run.mean_limit(5.0, 10.0) <= 2.5, run.limits
    assert run.mean_limit(22.0, 30.0) >= 14, run.limits


def test_the_round_trip_is_measured_at_the_minimum_now_and_then() -> None:
    """Every ``rtt_every_s``, one window at the minimum (BBR's PROBE_RTT), then back."""
    changes: list[LimitChange] = []
    limit = AdaptiveLimit(16, rtt_every_s=5.0, on_change=changes.append)
    simulate(limit, Parallel(0.001), 12.0)
    dips = [c for c in changes if c.reason == "measuring the round trip"]
    assert len(dips) == 2
    assert all(c.new == 1 for c in dips)
    assert limit.limit >= 12
    assert limit.min_rtt == pytest.approx(0.001)


def test_a_worker_with_little_to_send_learns_nothing() -> None:
    """Windows where fewer than the limit were in flight neither probe nor move it."""
    clock = Clock()
    limit = AdaptiveLimit(16, initial=4)
    for _ in range(200):
        clock.now += 0.01
        limit.succeeded(0.001, 2, clock.now)
    assert limit.limit == 4
    assert limit.max_rate is None


@pytest.mark.parametrize(("rtt_s", "floor"), [(0.004, 2), (0.040, 1)])
def test_the_floor_is_the_bandwidth_delay_product_at_a_fast_server_only(
    rtt_s: float, floor: int
) -> None:
    """One in flight at a time, each ``rtt_s``: the pipe holds one (rate times round
    trip), two with BBR's gain, which lets a group-commit server leave one in flight.
    At a slow server (round trips of ``floor_rtt_s`` or more) a second in flight must
    earn its place by probing, as a second worker's message in service looks just
    like a commit in progress."""
    clock = Clock()
    limit = AdaptiveLimit(16, min_window_s=0.0)
    limit.succeeded(rtt_s, 1, clock.now)  # starts the clock
    for _ in range(4):
        clock.now += rtt_s
        limit.succeeded(rtt_s, 1, clock.now)
    assert limit.max_rate == pytest.approx(1 / rtt_s)
    assert limit.min_rtt == rtt_s
    assert limit.floor == floor


@pytest.mark.parametrize(("lag_s", "grown"), [(0.010, [2, 3, 4, 5]), (0.0, [2, 1, 1, 1])])
def test_a_loop_that_explains_the_round_trip_grows_the_limit(
    lag_s: float, grown: list[int]
) -> None:
    """A busy worker reads its replies late: when its own lag explains the round trip,
    the server queues nothing and more in flight lets the worker overlap more of its
    own work. The same replies (of a slow server) with an idle loop stay at one (a
    first probe to two gains nothing and is undone)."""
    clock = Clock()
    limit = AdaptiveLimit(32, min_window_s=0.0, cruise_windows=100)
    limit.succeeded(0.040, 1, clock.now)  # starts the clock
    seen = []
    for _ in range(4):
        for _ in range(3):
            limit.lagged(lag_s)
        for _ in range(max(4, limit.limit)):
            clock.now += 0.040
            limit.succeeded(0.040, limit.limit, clock.now)
        seen.append(limit.limit)
    assert seen == grown


def test_changes_are_reported_once_each_with_the_rates() -> None:
    changes: list[LimitChange] = []
    limit = AdaptiveLimit(4, on_change=changes.append)
    simulate(limit, Parallel(0.001), 2.0)
    assert max(c.new for c in changes) == 4
    assert all(c.old != c.new for c in changes)
    assert changes[0].rate > 0
    assert changes[0].rtt_s == pytest.approx(0.001)
    assert changes[0].min_rtt_s == pytest.approx(0.001)


def test_a_failed_transaction_halves_the_limit() -> None:
    clock = Clock()
    changes: list[LimitChange] = []
    limit = AdaptiveLimit(32, initial=16, on_change=changes.append)
    limit.dropped(clock.now)
    assert limit.limit == 8
    assert limit.max_rate is None, "the server is measured afresh"
    assert limit.min_rtt is None
    for _ in range(5):
        limit.dropped(clock.now)
    assert limit.limit == 1, "never below the minimum"
    assert [c.new for c in changes] == [8, 4, 2, 1]
    assert changes[0].reason == "a transaction failed"
    assert math.isnan(changes[0].rate)


def test_after_a_failure_the_limit_is_learnt_again() -> None:
    limit = AdaptiveLimit(16)
    simulate(limit, Parallel(0.001), 2.0)
    assert limit.limit >= 12
    before = limit.limit
    limit.dropped(2.0)
    assert limit.limit == before // 2
    simulate(limit, Parallel(0.001), 2.0)
    assert limit.limit >= 12


def test_the_minimum_and_maximum_are_kept() -> None:
    run = simulate(AdaptiveLimit(8, minimum=3, initial=3), Serial(0.040), 20.0)
    assert min(v for _, v in run.limits) == 3
    run = simulate(AdaptiveLimit(8), Parallel(0.001), 10.0)
    assert max(v for _, v in run.limits) == 8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"maximum": 0, "minimum": 1}, r"maximum \(0\) must be at least minimum \(1\)"),
        ({"maximum": 4, "minimum": 0}, "minimum must be at least 1, got 0"),
        ({"maximum": 4, "initial": 5}, r"initial \(5\) must be between 1 and 4"),
        ({"maximum": 4, "gain": 0}, "gain must be positive, got 0"),
        ({"maximum": 4, "probe_gain": 1}, "probe_gain must be above 1, got 1"),
        ({"maximum": 4, "margin": -1}, "margin must not be negative, got -1"),
        ({"maximum": 4, "cruise_windows": 0}, "cruise_windows must be at least 1, got 0"),
        ({"maximum": 4, "own_factor": -1}, "own_factor must not be negative, got -1"),
        ({"maximum": 4, "min_samples": 0}, "min_samples must be at least 1, got 0"),
        ({"maximum": 4, "min_window_s": -1}, "min_window_s must not be negative, got -1"),
        ({"maximum": 4, "rate_windows": 0}, "rate_windows must be at least 1, got 0"),
        ({"maximum": 4, "rtt_every_s": 0}, "rtt_every_s must be positive, got 0"),
        ({"maximum": 4, "fast_rtt_s": -1}, "fast_rtt_s must not be negative, got -1"),
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
    limit.lagged(1.0)
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
