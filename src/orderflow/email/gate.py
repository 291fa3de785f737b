"""Hold sends while the SMTP server cannot be reached, instead of spending deliveries.

Without it, every order read during an SMTP outage fails, is retried by the bus with
backoff and, after ``ORDERFLOW_MAX_DELIVERIES`` attempts, is dead-lettered: a long
outage would move the whole backlog to the dead letters. With it, a circuit breaker:

* closed (normal): every send is attempted;
* a send fails with :class:`~orderflow.email.sender.SmtpUnreachable` (nothing sent:
  connecting, the greeting, TLS or the login failed): the gate opens;
* open: sends wait. One at a time, after a backoff (``base_s`` doubling to
  ``max_s``), a waiting send is tried as a probe; when one gets through the gate closes
  and the others go. The deliveries held meanwhile are not failed, so none is counted
  again or dead-lettered, and the worker, its concurrency used up, reads nothing new:
  consumption pauses until SMTP answers.

A failure once connected (a 4xx, a reset mid-transaction) is the email's, not the
server's reachability: it goes to the bus's retries as before. When the service
stops, :meth:`release` lets every held send be tried once more, failing as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from orderflow.email import metrics
from orderflow.email.sender import SmtpUnreachable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a gate still open says so in the log.
REPORT_EVERY_S = 30.0


class SmtpGate:
    """The circuit breaker in front of the SMTP server (see the module)."""

    def __init__(self, *, base_s: float = 0.5, max_s: float = 15.0) -> None:
        if not 0 < base_s <= max_s:
            raise ValueError(f"need 0 < base_s <= max_s, got {base_s} and {max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._delay = base_s
        self._closed = asyncio.Event()
        self._closed.set()
        self._released = asyncio.Event()
        self._probing = asyncio.Lock()
        self._opened_at = 0.0
        self._reported_at = 0.0
        #: Probes tried since the gate last opened.
        self.probes = 0

    @property
    def is_open(self) -> bool:
        """True while sends are held."""
        return not self._closed.is_set()

    def release(self) -> None:
        """Stop holding sends for good (the service is stopping)."""
        self._released.set()

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``, held while the gate is open, tried again when it closes."""
        while True:
            if self._closed.is_set() or self._released.is_set():
                try:
                    return await attempt()
                except SmtpUnreachable as exc:
                    if self._released.is_set():
                        raise
                    self._open(exc)
                continue
            async with self._probing:
                if self._closed.is_set() or self._released.is_set():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), self._delay)
                if self._released.is_set():
                    continue
                self.probes += 1
                try:
                    result = await attempt()
                except SmtpUnreachable as exc:
                    self._delay = min(self._delay * 2, self.max_s)
                    self._report(exc)
                    continue
                self._close()
                return result

    def _open(self, exc: SmtpUnreachable) -> None:
        if not self._closed.is_set():
            return
        self._closed.clear()
        self._delay = self.base_s
        self.probes = 0
        self._opened_at = self._reported_at = time.monotonic()
        metrics.SMTP_REACHABLE.set(0)
        log.warning(
            "SMTP server unreachable (%s): holding sends, consumption paused until it answers",
            exc.reason,
        )

    def _report(self, exc: SmtpUnreachable) -> None:
        now = time.monotonic()
        if now - self._reported_at >= REPORT_EVERY_S:
            self._reported_at = now
            log.warning(
                "SMTP server still unreachable after %.0f s (%s); sends held",
                now - self._opened_at,
                exc.reason,
            )

    def _close(self) -> None:
        self._closed.set()
        metrics.SMTP_REACHABLE.set(1)
        log.warning(
            "SMTP server answers again after %.1f s: sending", time.monotonic() - self._opened_at
        )
