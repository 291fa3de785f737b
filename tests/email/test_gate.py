"""The SMTP gate's logic: open on unreachable, hold, probe one at a time, close, release.

(Against a real SMTP server going down and up: tests/email/test_service.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from orderflow.email.gate import SmtpGate
from orderflow.email.sender import SmtpUnreachable, TransientSendError
from tests.support import wait_until


class Server:
    """A pretend SMTP server: up or down; counts attempts."""

    def __init__(self) -> None:
        self.up = True
        self.attempts = 0
        self.sent: list[int] = []

    def send(self, n: int) -> Callable[[], Awaitable[int]]:
        async def attempt() -> int:
            self.attempts += 1
            await asyncio.sleep(0)  # a real send yields to the loop; so does this one
            if not self.up:
                raise SmtpUnreachable("connection refused")
            self.sent.append(n)
            return n

        return attempt


def _gate() -> SmtpGate:
    return SmtpGate(base_s=0.01, max_s=0.04)


async def test_closed_gate_passes_each_send_through_once() -> None:
    gate, server = _gate(), Server()
    assert await gate.run(server.send(1)) == 1
    assert server.attempts == 1
    assert not gate.is_open


async def test_unreachable_opens_holds_every_send_and_probes_one_at_a_time() -> None:
    gate, server = _gate(), Server()
    server.up = False
    sends = [asyncio.create_task(gate.run(server.send(n))) for n in range(5)]
    await wait_until(lambda: gate.is_open and gate.probes >= 4)
    # Nothing failed: every send is still held.
    assert not any(task.done() for task in sends)
    # Each of the five failed once while closed; after that only probes were tried.
    assert server.attempts == 5 + gate.probes

    server.up = True
    assert sorted(await asyncio.gather(*sends)) == [0, 1, 2, 3, 4]
    assert not gate.is_open
    assert sorted(server.sent) == [0, 1, 2, 3, 4]


async def test_probes_back_off_to_the_maximum() -> None:
    gate, server = SmtpGate(base_s=0.01, max_s=0.02), Server()
    server.up = False
    task = asyncio.create_task(gate.run(server.send(1)))
    await wait_until(lambda: gate.probes >= 3)
    assert gate._delay == 0.02
    server.up = True
    assert await task == 1


async def test_release_lets_held_sends_fail_as_before() -> None:
    gate, server = _gate(), Server()
    server.up = False
    sends = [asyncio.create_task(gate.run(server.send(n))) for n in range(3)]
    await wait_until(lambda: gate.is_open)
    gate.release()
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(r, SmtpUnreachable) for r in results)
    # After release nothing is held any more: a new send fails at once.
    with pytest.raises(SmtpUnreachable):
        await gate.run(server.send(9))


async def test_other_failures_pass_through_and_leave_the_gate_closed() -> None:
    gate = _gate()

    async def deferred() -> None:
        raise TransientSendError("451 later")

    with pytest.raises(TransientSendError, match="451"):
        await gate.run(deferred)
    assert not gate.is_open


@pytest.mark.parametrize(("base", "top"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_bad_backoff_is_refused(base: float, top: float) -> None:
    with pytest.raises(ValueError, match="base_s"):
        SmtpGate(base_s=base, max_s=top)
