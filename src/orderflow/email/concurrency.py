"""How many SMTP transactions a worker keeps in flight at one server: an adaptive limit.

A message whose content the server has taken, but whose ``250`` the worker has not yet
recorded, is sent a second time if the worker dies (the one window the ledger cannot
close). Everything a worker has in flight at a server beyond what the server needs to
stay busy is only waiting in the server's queue, and widens that window for nothing.
So the number of transactions in flight follows the server instead of a fixed pool
(a send takes its place before it transmits anything and, in the Email Service, keeps
it until the send is recorded: see ``SmtpSender.holding``). Against a slow server the
limit should stay near what it serves at once; against a fast one, it must cost no
throughput.

**Why not delay alone, or rate alone.** The rule before this one was TCP Vegas as
Netflix's concurrency-limits applies it (``queue = limit * (1 - min_rtt / rtt)``;
Envoy's adaptive concurrency reads the same gradient against a periodically measured
minRTT). Delay says how many wait only if the server's rate is fixed, and it is not:
the embedded sink fsyncs its messages in groups, so a second message in flight waits
for the fsync in progress and then its own (the round trip doubles, the rate does not
move) while 4, 8 or 16 share one fsync (the rate grows, the round trip does not).
Vegas read the step from one to two as a queue and held the limit at 1-3. BBR's model
(Linux's ``tcp_bbr.c``: the pipe needs ``max delivery rate * min RTT`` in flight, the
bandwidth-delay product; in flight is capped at twice it, and the rate is probed by
sending more for a while) reads the rate instead, but a worker's rate also rises when
it takes a larger share of a slow server from another worker: measured in the chaos
scenario (two workers, one slow server), a limit from the delivery rate's
bandwidth-delay product climbed to 9-14 per worker, 2.5-4.75 duplicates per kill.

**The rule: probe for rate per round trip** (Kleinrock's power, the operating point
BBR aims at: the most delivery rate at the least round trip). Per window (at least
``min_window_s``, so that a rate is a rate and not a scheduling accident, and until
``max(limit, min_samples)`` transactions started in it have their reply: one round at
its limit, as BBR's round), with the limit used (a worker at 3 of 16 learns nothing of
16):

* **Probes**: after ``cruise_windows`` windows at the settled limit, one window a
  quarter above it (at least one more); kept if its rate per median round trip beats
  the best of the settled limit's last windows by ``margin`` (a noisy server makes
  lucky windows, and a lucky probe would stay), undone otherwise, and then the next
  probe goes a fifth below, kept if it does as well as their median. A serial server
  gains no rate from a third in flight and the round trip grows: undone. The
  group-fsync sink and a parallel server gain rate at the same round trip: kept, and
  the next probe follows at once, to the maximum. A worker that adds in flight at a
  server shared with another gains share, but the round trip grows more (the queue
  is everyone's): undone.
* **A fast server** (one transaction, with the fewest in flight, answered in under
  ``fast_rtt_s``: a local sink or relay, not a slow or remote one) is held to the
  spec's other half, no loss of throughput: a probe up is kept also when the rate
  alone rose by ``margin`` (a CPU-bound sink gains rate from more in flight while
  its round trips grow faster), and no probe goes down there (a kill duplicates
  what a few milliseconds let through, whatever the limit). From one worker, a
  slow server busy with another worker's message looks just like a batching one
  (measured: the chaos scenario's server, judged by rate, climbed to 9-14 per
  worker), which is why rate alone is trusted only where the round trip is short.
  The line is thin: that server answers one message in 5-10 ms on a quiet machine
  (50-300 ms on a busy one), the embedded sink in 2-4 ms alone and 10-25 ms beside
  the whole ``orderflow up`` stack on a busy machine; at 10 ms and 30 ms the chaos
  scenario failed (1.25-1.5 duplicates per kill), hence 5 ms.
* **The bandwidth-delay floor** (BBR's ``2 * rate * min RTT``), at most two and only
  at a fast server: what lets the group-fsync sink leave one in flight, where the
  step to two halves the rate per round trip. At most two, and not at a slow server,
  because from one worker a slow server busy with another worker's message looks
  exactly like a commit in progress (measured: an uncapped floor reached 14 in the
  chaos scenario).
* **The round trip with the fewest in flight** is measured as BBR's PROBE_RTT and
  Envoy's minRTT window do: a window at ``minimum`` every ``rtt_every_s`` (its median:
  one lucky reply is not the server); a lower window median meanwhile lowers it. At
  a serial server every round trip but the first waits behind another, so a minimum
  taken at the working limit would grow with it.
* **Our own delay is not the server's queue.** A worker short of CPU reads each reply
  late, and its round trips grow with its own load: against a fast server it would
  otherwise take its own slowness for a queue. So the event loop's lag is measured
  (how late a short timer fires), and a window whose median round trip is within
  ``own_factor`` times the mean lag is the worker's own: the limit grows a quarter
  (more in flight lets the worker overlap its own Redis round trips; the server
  queues nothing), a probe up is kept, a probe down is not.
* **Loss feedback** (Postfix's destination concurrency scheduler: negative feedback on
  a failed connection): a transaction that timed out or lost its connection halves
  the limit, and what was measured is measured afresh. Like Postfix, it starts a
  destination low (``initial`` one) and grows it on success.

The limit stays between ``minimum`` and ``maximum``. :class:`AdaptiveLimit` and
:class:`FixedLimit` are pure logic (time is passed in); :class:`ConcurrencyLimiter`
hands out permits in an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Protocol


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
    #: The deciding window's rate (replies per second) and median round trip, and the
    #: server's round trip with the fewest in flight (seconds; NaN: not known).
    rate: float
    rtt_s: float
    min_rtt_s: float
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


Phase = Literal["cruise", "up", "down"]


class AdaptiveLimit:
    """Probes for rate per round trip above a bandwidth-delay floor, our own delay,
    loss halving (see the module's docstring)."""

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        initial: int = 1,
        gain: float = 2.0,
        probe_gain: float = 1.25,
        margin: float = 0.15,
        cruise_windows: int = 4,
        own_factor: float = 4.0,
        min_samples: int = 4,
        min_window_s: float = 0.05,
        rate_windows: int = 10,
        rtt_every_s: float = 10.0,
        fast_rtt_s: float = 0.005,
        on_change: Callable[[LimitChange], None] | None = None,
    ) -> None:
        if minimum < 1:
            raise ValueError(f"minimum must be at least 1, got {minimum}")
        if maximum < minimum:
            raise ValueError(f"maximum ({maximum}) must be at least minimum ({minimum})")
        if not minimum <= initial <= maximum:
            raise ValueError(f"initial ({initial}) must be between {minimum} and {maximum}")
        if not gain > 0:
            raise ValueError(f"gain must be positive, got {gain}")
        if not probe_gain > 1:
            raise ValueError(f"probe_gain must be above 1, got {probe_gain}")
        if not margin >= 0:
            raise ValueError(f"margin must not be negative, got {margin}")
        if cruise_windows < 1:
            raise ValueError(f"cruise_windows must be at least 1, got {cruise_windows}")
        if not own_factor >= 0:
            raise ValueError(f"own_factor must not be negative, got {own_factor}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        if not min_window_s >= 0:
            raise ValueError(f"min_window_s must not be negative, got {min_window_s}")
        if rate_windows < 1:
            raise ValueError(f"rate_windows must be at least 1, got {rate_windows}")
        if not rtt_every_s > 0:
            raise ValueError(f"rtt_every_s must be positive, got {rtt_every_s}")
        if not fast_rtt_s >= 0:
            raise ValueError(f"fast_rtt_s must not be negative, got {fast_rtt_s}")
        self.maximum = maximum
        self.minimum = minimum
        self.gain = gain
        self.probe_gain = probe_gain
        self.margin = margin
        self.cruise_windows = cruise_windows
        self.own_factor = own_factor
        self.min_samples = min_samples
        self.min_window_s = min_window_s
        self.rtt_every_s = rtt_every_s
        self.fast_rtt_s = fast_rtt_s
        self.on_change = on_change
        self._limit = initial
        #: What this window measures: the settled limit, or a probe above or below it.
        self.phase: Phase = "cruise"
        #: The settled limit, which a failed probe returns to, and its power (rate
        #: per round trip) in its last windows, newest last.
        self._settled = initial
        self._powers: deque[float] = deque(maxlen=3)
        self._settled_rates: deque[float] = deque(maxlen=3)
        self._cruise_left = 1
        self._next_probe: Phase = "up"
        #: Recent windows' rates, newest last: ``max_rate`` is the fastest.
        self._rates: deque[float] = deque(maxlen=rate_windows)
        #: The server's round trip with the fewest in flight (inf: not measured), when
        #: it was measured, and the limit its window interrupted.
        self._min_rtt = math.inf
        self._rtt_at = -math.inf
        #: The last window at the minimum's median alone (what ``fast`` is about).
        self._rtt_at_minimum = math.inf
        self._resume: int | None = None
        self._window_start: float | None = None
        #: Replies in this window; the round trips of those whose transaction started
        #: in it (under its limit), and the most in flight any of those started with.
        self._replies = 0
        self._window: list[float] = []
        self._peak = 0
        self._lag_sum = 0.0
        self._lag_count = 0

    @property
    def limit(self) -> int:
        """Transactions allowed in flight now."""
        return self._limit

    @property
    def max_rate(self) -> float | None:
        """The fastest of the last ``rate_windows`` windows' rates (replies per second)."""
        return max(self._rates) if self._rates else None

    @property
    def min_rtt(self) -> float | None:
        """The server's round trip with the fewest in flight (seconds), once measured.

        At a serial server every round trip but the first waits behind another, so a
        minimum taken while the limit is used would grow with the limit, and the floor
        with it. It is measured as BBR's PROBE_RTT and Envoy's minRTT window do: the
        median of a window at the minimum in flight, every ``rtt_every_s`` (a median:
        one lucky reply is not the server); a lower window median meanwhile lowers it."""
        return self._min_rtt if math.isfinite(self._min_rtt) else None

    @property
    def fast(self) -> bool:
        """Whether the server answered one transaction in under ``fast_rtt_s`` (the
        median of the last window at the minimum)."""
        return self._rtt_at_minimum < self.fast_rtt_s

    @property
    def floor(self) -> int:
        """``gain * max_rate * min_rtt``, rounded, within the bounds: the bandwidth-delay
        product with BBR's headroom, below which no probe goes."""
        rate, rtt = self.max_rate, self.min_rtt
        if rate is None or rtt is None or not self.fast:
            return self.minimum
        needed = min(2, math.floor(self.gain * rate * rtt + 0.5))
        return min(self.maximum, max(self.minimum, needed))

    def succeeded(self, rtt_s: float, in_flight: int, now: float) -> None:
        """Count a reply; at the end of a window, decide."""
        if rtt_s < 0:
            raise ValueError(f"rtt_s must not be negative, got {rtt_s}")
        if self._window_start is None:
            # The first reply only starts the clock: a rate needs an interval.
            self._window_start = now
            return
        self._replies += 1
        if now - rtt_s >= self._window_start - 1e-9:
            # Started in this window, under this limit: what the window is about.
            self._window.append(rtt_s)
            self._peak = max(self._peak, in_flight)
        elapsed = now - self._window_start
        if len(self._window) < max(self._limit, self.min_samples) or elapsed < self.min_window_s:
            return
        rate = self._replies / elapsed if elapsed > 0 else math.inf
        samples = sorted(self._window)
        median = samples[len(samples) // 2]
        lag = self._lag_sum / self._lag_count if self._lag_count else 0.0
        used = self._peak >= self._limit
        self._window_start = now
        self._window.clear()
        self._replies = 0
        self._peak = 0
        self._lag_sum = 0.0
        self._lag_count = 0
        self._window_ended(rate, median, lag, used, now)

    def _window_ended(self, rate: float, median: float, lag: float, used: bool, now: float) -> None:
        if not math.isfinite(rate) or median <= 0:
            return
        if self._limit == self.minimum:
            self._min_rtt, self._rtt_at = median, now
            self._rtt_at_minimum = median
        else:
            self._min_rtt = min(self._min_rtt, median)
        resume, self._resume = self._resume, None
        if resume is not None:
            self._set(resume, rate, median, "measured the round trip")
            return
        if not used:
            # The worker had less to send than the limit allows: its rate is the
            # worker's, not the server's, and says nothing of this limit.
            if self.phase != "cruise":
                self._end_probe(self._next_probe, rate, median, "nothing to probe with")
            return
        self._rates.append(rate)
        if now - self._rtt_at >= self.rtt_every_s and self._limit > self.minimum:
            self._resume = self._settled
            self.phase = "cruise"
            self._set(self.minimum, rate, median, "measuring the round trip")
            return
        own = median <= lag * self.own_factor
        power = rate / median
        if self.phase == "up":
            # More in flight must beat the best of the settled limit's last windows:
            # a noisy server makes lucky windows, and a lucky probe would stay.
            # The margin scales with the step (a last step to the maximum is smaller).
            step = (self._limit / self._settled - 1) / (self.probe_gain - 1)
            better = 1 + self.margin * min(1.0, step)
            if (
                own
                or (self._powers and power >= max(self._powers) * better)
                or (self.fast and self._settled_rates and rate >= max(self._settled_rates) * better)
            ):
                self._settled = self._limit
                self._powers.clear()
                self._powers.append(power)
                self._settled_rates.clear()
                self._settled_rates.append(rate)
                self._probe("up", rate, median)
            else:
                self._end_probe("down", rate, median, "more in flight: not more rate per delay")
            return
        if self.phase == "down":
            # Fewer in flight need only do as well as the settled limit usually does.
            if not own and self._powers and power >= statistics.median(self._powers):
                self._settled = self._limit
                self._powers.clear()
                self._powers.append(power)
                self._settled_rates.clear()
                self._settled_rates.append(rate)
                self._probe("down", rate, median)
            else:
                self._end_probe("up", rate, median, "fewer in flight: less rate per delay")
            return
        self._powers.append(power)
        self._settled_rates.append(rate)
        floor = self.floor
        if own:
            # A round trip our own event loop explains: the replies wait for us, not
            # the server for them. More in flight lets a busy worker overlap more of
            # its own work (its Redis round trips); the server queues nothing.
            self._settled = min(self.maximum, self._up(self._limit))
            self._set(self._settled, rate, median, "our own event loop is the delay")
            return
        if self._limit < floor:
            self._settled = floor
            self._set(floor, rate, median, "the bandwidth-delay product needs more")
            self._cruise_left = 1
            return
        self._cruise_left -= 1
        if self._cruise_left <= 0:
            self._probe(self._next_probe, rate, median)

    def _up(self, limit: int) -> int:
        return max(limit + 1, math.ceil(limit * self.probe_gain))

    def _probe(self, direction: Phase, rate: float, median: float) -> None:
        """A window above (or below) the settled limit; where there is no room that
        way, the other way; with none either way, cruise."""
        settled = self._settled
        up = min(self.maximum, self._up(settled))
        down = max(
            self.minimum, self.floor, min(settled - 1, math.floor(settled / self.probe_gain))
        )
        # A fast server is probed upward only: fewer in flight there would save
        # little of the duplicate window and cost rate (see the module's docstring).
        ways = ("up",) if self.fast else (direction, "down" if direction == "up" else "up")
        for way in ways:
            if way == "up" and up > settled:
                self.phase = "up"
                self._set(up, rate, median, "probing with more in flight")
                return
            if way == "down" and down < settled:
                self.phase = "down"
                self._set(down, rate, median, "probing with fewer in flight")
                return
        self.phase = "cruise"
        self._cruise_left = self.cruise_windows
        self._set(settled, rate, median, "settled")

    def _end_probe(self, next_probe: Phase, rate: float, median: float, reason: str) -> None:
        self.phase = "cruise"
        self._cruise_left = self.cruise_windows
        self._next_probe = next_probe
        self._set(self._settled, rate, median, reason)

    def lagged(self, lag_s: float) -> None:
        """Count one lateness of the event loop into this window's mean lag."""
        self._lag_sum += max(0.0, lag_s)
        self._lag_count += 1

    def dropped(self, now: float) -> None:
        """Halve the limit (a timeout or a lost connection is the strongest signal),
        and measure the server afresh."""
        self._rates.clear()
        self._min_rtt = math.inf
        self._rtt_at = -math.inf
        self._rtt_at_minimum = math.inf
        self._resume = None
        self._window_start = None
        self._window.clear()
        self._replies = 0
        self._peak = 0
        self._powers.clear()
        self._settled_rates.clear()
        self.phase = "cruise"
        self._cruise_left = self.cruise_windows
        self._next_probe = "up"
        self._settled = max(self.minimum, self._limit // 2)
        self._set(self._settled, math.nan, math.nan, "a transaction failed")

    def _set(self, value: int, rate: float, rtt_s: float, reason: str) -> None:
        old = self._limit
        self._limit = min(self.maximum, max(self.minimum, value))
        if self._limit != old and self.on_change is not None:
            min_rtt = math.nan if self.min_rtt is None else self._min_rtt
            self.on_change(LimitChange(old, self._limit, rate, rtt_s, min_rtt, reason))


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
