"""How many SMTP transactions a worker keeps in flight at one server: an adaptive limit.

A message whose content the server has taken, but whose ``250`` the worker has not yet
recorded, is sent a second time if the worker dies (the one window the ledger cannot
close). Everything a worker has in flight at a server beyond what the server needs to
stay busy is only waiting in the server's queue, and widens that window for nothing.
So the number of transactions in flight follows the server instead of a fixed pool
(a send takes its place before it transmits anything and, in the Email Service, keeps
it until the send is recorded: see ``SmtpSender.holding``):

* **Delay feedback** (TCP Vegas, as Netflix's concurrency-limits applies it; Envoy's
  adaptive concurrency): a transaction's round trip grows with the queue in front of
  it. With ``limit`` transactions in flight, a window whose median round trip is
  ``median`` against a baseline (the best recent window's median) has about
  ``queue = limit * (1 - baseline / median)`` of them waiting at the server rather
  than being served. Above ``beta`` the limit shrinks to what the server serves,
  ``limit - queue``, plus ``alpha`` (at most by half a window); below ``alpha`` it
  grows by one per window (Postfix's positive feedback of 1/concurrency per delivery),
  but only while the limit was really used (a worker at 3 of 32 learns nothing of 32).
* **Slow start** (Postfix's destination concurrency scheduler, TCP): from one, the
  limit doubles every window until the first queue (``alpha``) shows.
* **Our own delay is not the server's queue.** A worker busy with its other work (or
  short of CPU) reads each reply late, and its round trips grow with its own load, not
  the server's: against a fast server, a busy worker would otherwise take its own
  slowness for a queue and give up throughput. So the event loop's lag is measured
  too (how late a short timer fires), and a slow window counts as a queue only when
  its median also exceeds ``own_factor`` times the window's mean lag (a transaction
  waits for the loop once per reply, and for the poll that reads it).
* **Loss feedback**: a transaction that timed out or lost its connection halves it.

The baseline is the lowest window median of the last ``baseline_s`` seconds (and at
least the last window's), so it follows a server that became slower for good, and a
shrunken limit measures a fresh one. The limit stays between ``minimum`` and
``maximum`` (the worker's pool of connections). A window is ``max(limit,
min_samples)`` transactions: about one round trip of the whole window.

:class:`AdaptiveLimit` and :class:`FixedLimit` are pure logic (time is passed in);
:class:`ConcurrencyLimiter` hands out permits in an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol


class Limit(Protocol):
    """An algorithm deciding how many transactions may be in flight."""

    @property
    def limit(self) -> int:
        """Transactions allowed in flight now."""
        ...

    def succeeded(self, rtt_s: float, in_flight: int, now: float) -> None:
        """A transaction got its reply after ``rtt_s`` seconds, with ``in_flight``
        transactions (itself included) in flight when it started."""
        ...

    def dropped(self, now: float) -> None:
        """A transaction timed out or lost its connection."""
        ...

    def lagged(self, lag_s: float) -> None:
        """The event loop ran a timer ``lag_s`` seconds late."""
        ...


@dataclass(frozen=True, slots=True)
class LimitChange:
    """What a window decided, for logs and tests."""

    old: int
    new: int
    #: The window's median round trip, the baseline it was compared with and the
    #: event loop's mean lag meanwhile (seconds).
    rtt_s: float
    baseline_s: float
    lag_s: float
    reason: str


class FixedLimit:
    """Always ``maximum``: the behaviour before the adaptive limit (for comparisons)."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError(f"maximum must be at least 1, got {maximum}")
        self._limit = maximum

    @property
    def limit(self) -> int:
        """Transactions allowed in flight: always the maximum."""
        return self._limit

    def succeeded(self, rtt_s: float, in_flight: int, now: float) -> None:
        """Nothing to learn."""

    def dropped(self, now: float) -> None:
        """Nothing to learn."""

    def lagged(self, lag_s: float) -> None:
        """Nothing to learn."""


class AdaptiveLimit:
    """Slow start, then delay and loss feedback (see the module's docstring)."""

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int = 1,
        alpha: float = 0.5,
        beta: float = 1.0,
        own_factor: float = 4.0,
        min_samples: int = 4,
        baseline_s: float = 10.0,
        on_change: Callable[[LimitChange], None] | None = None,
    ) -> None:
        if minimum < 1:
            raise ValueError(f"minimum must be at least 1, got {minimum}")
        if maximum < minimum:
            raise ValueError(f"maximum ({maximum}) must be at least minimum ({minimum})")
        if not minimum <= initial <= maximum:
            raise ValueError(f"initial ({initial}) must be between {minimum} and {maximum}")
        if not 0 < alpha <= beta:
            raise ValueError(f"alpha ({alpha}) must be positive and at most beta ({beta})")
        if not own_factor >= 0:
            raise ValueError(f"own_factor must not be negative, got {own_factor}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        if not baseline_s > 0:
            raise ValueError(f"baseline_s must be positive, got {baseline_s}")
        self.maximum = maximum
        self.minimum = minimum
        self.alpha = alpha
        self.beta = beta
        self.own_factor = own_factor
        self.min_samples = min_samples
        self.baseline_s = baseline_s
        self.on_change = on_change
        self._limit = float(initial)
        #: Slow start until the first sign of a queue (or loss).
        self.slow_start = True
        self._window: list[float] = []
        #: The most transactions in flight that a sample of this window started with.
        self._window_peak = 0
        self._lag_sum = 0.0
        self._lag_count = 0
        #: (when, median) of recent windows, oldest first: the baseline's candidates.
        self._medians: deque[tuple[float, float]] = deque()

    @property
    def limit(self) -> int:
        """Transactions allowed in flight now."""
        return int(self._limit)

    @property
    def baseline(self) -> float | None:
        """The best window median of the last ``baseline_s`` seconds, once there is one."""
        return min(m for _, m in self._medians) if self._medians else None

    def succeeded(self, rtt_s: float, in_flight: int, now: float) -> None:
        """Count a reply; at the end of a window, decide."""
        if rtt_s < 0:
            raise ValueError(f"rtt_s must not be negative, got {rtt_s}")
        self._window.append(rtt_s)
        self._window_peak = max(self._window_peak, in_flight)
        if len(self._window) < max(self.limit, self.min_samples):
            return
        samples = sorted(self._window)
        median = samples[len(samples) // 2]
        used = self._window_peak * 2 > self.limit
        lag = self._lag_sum / self._lag_count if self._lag_count else 0.0
        self._clear_window()
        while self._medians and self._medians[0][0] < now - self.baseline_s:
            self._medians.popleft()
        self._medians.append((now, median))
        baseline = min(m for _, m in self._medians)
        # A round trip our own event loop explains (``own_factor`` waits for it) says
        # nothing about the server's queue.
        own = median <= lag * self.own_factor
        queue = 0.0 if own else self._limit * (1 - baseline / median)
        if queue > self.beta:
            self.slow_start = False
            target = max(self._limit / 2, self._limit - queue + self.alpha)
            self._set(target, median, baseline, lag, "replies slowed down")
        elif queue >= self.alpha:
            # A queue is forming: hold (and the doubling is over).
            self.slow_start = False
        elif not used:
            return
        elif self.slow_start:
            self._set(self._limit * 2, median, baseline, lag, "slow start")
        elif own and median > baseline:
            self._set(self._limit + 1, median, baseline, lag, "our own event loop is the delay")
        else:
            self._set(self._limit + 1, median, baseline, lag, "replies as fast as the baseline")

    def lagged(self, lag_s: float) -> None:
        """Count one lateness of the event loop into this window's mean lag."""
        self._lag_sum += max(0.0, lag_s)
        self._lag_count += 1

    def dropped(self, now: float) -> None:
        """Halve the limit (a timeout or a lost connection is the strongest signal)."""
        self.slow_start = False
        self._clear_window()
        baseline = self.baseline or 0.0
        self._set(self._limit / 2, math.nan, baseline, math.nan, "a transaction failed")

    def _clear_window(self) -> None:
        self._window.clear()
        self._window_peak = 0
        self._lag_sum = 0.0
        self._lag_count = 0

    def _set(
        self, value: float, rtt_s: float, baseline_s: float, lag_s: float, reason: str
    ) -> None:
        old = self.limit
        self._limit = min(float(self.maximum), max(float(self.minimum), value))
        if self.limit != old and self.on_change is not None:
            self.on_change(LimitChange(old, self.limit, rtt_s, baseline_s, lag_s, reason))


#: How often the event loop's lag is sampled while transactions are in flight or wait.
LAG_INTERVAL_S = 0.005


class ConcurrencyLimiter:
    """Permits for SMTP transactions, as many at once as ``algorithm.limit`` allows.

    Waiters are served first come, first served. When the limit shrinks below what is
    in flight, no permit is given until enough of those finish. While any permit is
    held or awaited, a timer every ``lag_interval_s`` tells the algorithm how late the
    event loop runs it (None: no such timer).
    """

    def __init__(
        self,
        algorithm: Limit,
        *,
        clock: Callable[[], float] | None = None,
        lag_interval_s: float | None = LAG_INTERVAL_S,
    ) -> None:
        if lag_interval_s is not None and not lag_interval_s > 0:
            raise ValueError(f"lag_interval_s must be positive, got {lag_interval_s}")
        self.algorithm = algorithm
        self._clock = clock
        self._lag_interval_s = lag_interval_s
        self._lag_task: asyncio.Task[None] | None = None
        #: Transactions holding a permit now.
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._woken = 0

    @property
    def limit(self) -> int:
        """Transactions allowed in flight now."""
        return self.algorithm.limit

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def acquire(self) -> Permit:
        """Wait for room and take it; the caller must :meth:`Permit.release` it."""
        if self._lag_interval_s is not None and (self._lag_task is None or self._lag_task.done()):
            self._lag_task = asyncio.create_task(self._measure_lag(self._lag_interval_s))
        if self.in_flight + self._woken >= self.limit or self._waiters:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Woken, then cancelled before it ran: pass its place on.
                    self._woken -= 1
                    self._wake()
                else:
                    self._waiters.remove(waiter)
                raise
            self._woken -= 1
        self.in_flight += 1
        return Permit(self, self.in_flight)

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[Permit]:
        """:meth:`acquire`, released at the end of the block whatever happens."""
        permit = await self.acquire()
        try:
            yield permit
        finally:
            permit.release()

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        # A woken waiter runs later: its place is reserved (``_woken``) meanwhile, so
        # that no newcomer takes it.
        while self._waiters and self.in_flight + self._woken < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1

    async def _measure_lag(self, interval: float) -> None:
        """Until nothing is in flight or waiting: how late a timer of ``interval`` runs."""
        loop = asyncio.get_running_loop()
        while self.in_flight or self._waiters or self._woken:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.algorithm.lagged(loop.time() - due)

    async def close(self) -> None:
        """Stop measuring the loop's lag (it also stops by itself once idle)."""
        task, self._lag_task = self._lag_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _succeeded(self, rtt_s: float, in_flight: int) -> None:
        self.algorithm.succeeded(rtt_s, in_flight, self._now())
        self._wake()

    def _dropped(self) -> None:
        self.algorithm.dropped(self._now())


class Permit:
    """One transaction's place; it reports how the transaction went."""

    def __init__(self, limiter: ConcurrencyLimiter, in_flight: int) -> None:
        self._limiter = limiter
        #: Transactions in flight when this one got its place (itself included).
        self.in_flight = in_flight
        self._started: float | None = None
        self.released = False

    def release(self) -> None:
        """Give the place back (again: nothing)."""
        if not self.released:
            self.released = True
            self._limiter._release()

    def start(self) -> None:
        """The transaction's first byte is about to be written: the round trip starts."""
        self._started = self._limiter._now()

    def succeeded(self) -> None:
        """The server answered the transaction (whatever it answered)."""
        if self._started is None:
            raise RuntimeError("succeeded() before start()")
        self._limiter._succeeded(self._limiter._now() - self._started, self.in_flight)

    def dropped(self) -> None:
        """The transaction timed out or its connection was lost."""
        self._limiter._dropped()
