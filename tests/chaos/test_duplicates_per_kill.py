"""Duplicates per worker SIGKILL with a slow SMTP server: the adaptive concurrency limit.

A message the server has taken but whose ``250`` its worker has not recorded is sent
again after the worker dies (the documented window). A worker that keeps a fixed
pool of transactions in flight at a server slower than itself has all of them queued
there: each SIGKILL then duplicates about as many emails as were queued. The adaptive
limit (``orderflow.email.concurrency``) keeps in flight what the server needs, so a
kill finds about one message transmitted and unrecorded, not a pool's worth.

``ORDERFLOW_CHAOS_SMTP_CONCURRENCY=fixed`` runs the same scenario without the limit
(the pool of connections always in use, as before it): it fails the per-kill bound
(7 to 22 duplicates in 4 kills when this was written, against 0 to 4 with the limit),
which is how the bound was seen to test the limit.

The quick run kills 8 times, not 4: the bound is on the average, and 4 kills measured
it too roughly (one make test saw 5 duplicates in 4 kills, 1.25 per kill, among runs
of 0 to 0.5). With 8 kills, 13 runs with the limit passed (the 7 whose figures were
kept: 0.25 to 0.5 per kill), and two with ``fixed`` failed (5.88 and 6.88), for some
4 s more per run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from .conftest import (
    SCENARIO_TIMEOUT,
    Record,
    Stack,
    chaos_rng,
    duplicates_file,
    size,
    wait_until,
    write_duplicate_report,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, SCENARIO_TIMEOUT]

#: At most this many duplicate emails per SIGKILL, on average.
MAX_DUPLICATES_PER_KILL = 1.0


@dataclass
class Kill:
    """One SIGKILL: when, whom, and how many orders had been emailed by then."""

    at: float
    worker: str
    emailed: int


async def _kill_at_progress(stack: Stack, count: int, kills: int, log: list[Kill]) -> None:
    """SIGKILL a worker each time another ``1 / (kills + 1)`` of the ``count`` orders has
    been emailed, and start it again, ``kills`` times.

    Spacing the kills by progress rather than by the clock keeps every kill inside the
    run whatever the machine's speed (on a fast machine, kills every 2 s outlived the
    run: the last one found every email sent and measured nothing). The workers are
    killed in turn, so each kill hits a worker that has been sending since the kill
    before it, not one still starting up.
    """
    rng = chaos_rng()
    first = rng.randrange(len(stack.workers))
    for k in range(1, kills + 1):
        threshold = k * count // (kills + 1)
        await wait_until(
            lambda threshold=threshold: len(stack.handler.by_order) >= threshold,
            timeout=120,
            what=f"{threshold} of {count} orders emailed before kill {k}",
        )
        worker = stack.workers[(first + k) % len(stack.workers)]
        emailed = len(stack.handler.by_order)
        stack.kill_worker(worker)
        log.append(Kill(time.monotonic(), worker.name, emailed))
        # The fault schedule itself (down for 0.3 s), not a wait for something to happen.
        await asyncio.sleep(0.3)
        stack.restart_worker(worker)


async def test_a_worker_sigkill_duplicates_at_most_one_email_on_average_with_a_slow_server(
    make_stack: Callable[..., Awaitable[Stack]], reliability: Record
) -> None:
    count = size(600, 5000)
    kills = size(8, 20)
    mode = os.environ.get("ORDERFLOW_CHAOS_SMTP_CONCURRENCY", "adaptive")
    reliability.scenario = "Duplicates per worker SIGKILL, slow SMTP server"
    reliability.must_hold = (
        f"{count} orders POSTed by 6 clients, 2 email workers (concurrency 32), one "
        f"SIGKILLed and restarted at each 1/{kills + 1} of the orders emailed, a server "
        "parsing each message (one at a "
        f"time): at most {MAX_DUPLICATES_PER_KILL:g} duplicate per kill on average, each "
        "attributed to a kill; none lost"
    )
    stack = await make_stack()
    stack.handler.parse = True
    await stack.start_api()
    # The claim timeout of the measurement; the SMTP concurrency under test.
    worker_env = stack.env(claim_idle_ms="2000", smtp_concurrency=mode)
    for _ in range(2):
        stack.start_worker(worker_env, concurrency=32)
    log: list[Kill] = []
    started = time.monotonic()
    chaos = asyncio.create_task(_kill_at_progress(stack, count, kills, log))
    accepted = await stack.submit(list(range(1, count + 1)), concurrency=6)
    await chaos
    await stack.settle(accepted, timeout=size(90, 300))
    settled_s = time.monotonic() - started
    result = await stack.account(accepted)
    write_duplicate_report(stack, result, duplicates_file("duplicates-per-kill"))

    while_sending = sum(1 for kill in log if 0 < kill.emailed < count)
    per_kill = result.duplicate_emails / len(log)
    reliability.figures = {
        "orders": count,
        "accepted": result.accepted,
        "SMTP concurrency": mode,
        "worker kills": len(log),
        "kills while emails were being sent": while_sending,
        "emails": len(stack.handler.mails),
        "duplicates": result.duplicate_emails,
        "duplicates per kill": round(per_kill, 2),
        "lost": len(result.lost),
        "dead letters": result.dead_letters,
        "settled in s": round(settled_s, 1),
    }
    if result.duplicates:
        reliability.notes = (
            f"{result.duplicate_emails} duplicate email(s) in {len(log)} kills: "
            + "; ".join(f"order {i}: {why}" for i, why in sorted(result.excused.items()))
            + (f"; unexplained: {result.unexplained}" if result.unexplained else "")
            + "; details in test-artifacts/duplicates/"
        )
    assert result.accepted == count
    assert result.lost == []
    assert result.unexpected == []
    assert result.unexplained == {}, f"duplicates no kill explains: {result.unexplained}"
    assert result.dead_letters == 0
    assert result.pending == 0
    assert result.unconfirmed == 0
    # Each kill must have hit workers with emails to send, or it measured nothing.
    assert while_sending == len(log) == kills, (
        f"only {while_sending} of {len(log)} kills came while emails were being sent: {log}"
    )
    assert per_kill <= MAX_DUPLICATES_PER_KILL, (
        f"{result.duplicate_emails} duplicates in {len(log)} kills ({per_kill:.2f} per "
        f"kill, SMTP concurrency {mode}): {result.excused}"
    )
