"""The per-order email ledger in Redis: the one place that decides who sends an email.

One hash per order, ``orderflow:email:{<order id>}`` (the braces make it a Redis
Cluster hash tag, so the key's slot depends on the order id only):

* absent: nobody has sent, nobody is sending;
* ``state=sending``, ``token=<sender's token>``, with a TTL (the lease): one sender
  owns the order; it renews the lease while its SMTP send runs. When the sender dies
  the key expires and the order can be claimed again;
* ``state=sent``, ``message_id``, ``at``, kept for ``sent_ttl_s`` (30 days): the email
  went out; duplicates are acknowledged without sending.

Every transition is one Lua script, so two workers can never both claim an order.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from orderflow.bus.entries import text

#: Prefix of the ledger's keys; the full key is ``orderflow:email:{<order id>}``.
KEY_PREFIX = "orderflow:email:"
#: How long a ``sent`` record is kept: duplicates older than this would send again.
SENT_TTL_S = 30 * 24 * 3600

# KEYS[1] ledger key; ARGV token, lease ms. Returns {'claimed'} | {'sent', message_id,
# at} | {'busy', pttl}.
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'message_id', 'at')
if rec[1] == 'sent' then return {'sent', rec[2] or '', rec[3] or ''} end
if rec[1] == 'sending' then return {'busy', tostring(redis.call('PTTL', KEYS[1]))} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'sending', 'token', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'claimed'}
"""

# KEYS[1]; ARGV token, lease ms. 1 if the caller still holds the lease (renewed).
_RENEW = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] == 'sending' and rec[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1]; ARGV token, message id, at, ttl ms. The email was accepted by SMTP, so the
# order is sent whoever holds the lease now; the record keeps the token of a sender
# that held the lease. Returns 1 if the caller held the lease, 0 if its lease had been
# lost (another sender may have sent too), 2 if it was marked sent already, 3 if the
# caller itself had marked it holding the lease (a retry whose first reply was lost).
_MARK_SENT = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] == 'sent' then
  if rec[2] == ARGV[1] then return 3 end
  return 2
end
local held = rec[1] == 'sending' and rec[2] == ARGV[1]
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'sent', 'message_id', ARGV[2], 'at', ARGV[3],
  'token', held and ARGV[1] or '')
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if held then return 1 end
return 0
"""

# KEYS[1] ledger key, KEYS[2] a stream; ARGV token, message id, at, ttl ms, then the
# entry's field/value pairs. _MARK_SENT, then XADD the entry (the email.sent event):
# the event is appended only once the record is written, and not again by a retry of
# the same sender (3). Returns {mark, entry id or false}.
_MARK_SENT_AND_APPEND = (
    "local function mark()\n"
    + _MARK_SENT
    + "\nend\nlocal marked = mark()\n"
    + "if marked == 3 then return {marked, false} end\n"
    + "return {marked, redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))}\n"
)

# KEYS[1]; ARGV token. Gives the order back after a failed send, so a retry needs not
# wait for the lease to run out. Only the holder can release.
_RELEASE = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] == 'sending' and rec[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class ClaimState(enum.Enum):
    """What claiming an order found."""

    #: The caller holds the lease and must send.
    CLAIMED = "claimed"
    #: Already sent: acknowledge without sending.
    SENT = "sent"
    #: Another live sender holds the lease.
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of :meth:`EmailLedger.claim`."""

    state: ClaimState
    #: For SENT: the recorded Message-ID and time.
    message_id: str | None = None
    at: str | None = None
    #: For BUSY: milliseconds left on the other sender's lease.
    lease_left_ms: int = 0


#: _MARK_SENT's answers that mean the caller held the lease when it marked.
_HELD = frozenset({1, 3})


def ledger_key(order_id: int) -> str:
    """The ledger key of an order."""
    return f"{KEY_PREFIX}{{{order_id}}}"


class EmailLedger:
    """Atomic per-order send records: claim, renew, mark sent, release."""

    def __init__(
        self, redis: aioredis.Redis, *, lease_ms: int, sent_ttl_s: int = SENT_TTL_S
    ) -> None:
        if lease_ms < 1:
            raise ValueError(f"lease_ms must be positive, got {lease_ms}")
        if sent_ttl_s < 1:
            raise ValueError(f"sent_ttl_s must be positive, got {sent_ttl_s}")
        self.lease_ms = lease_ms
        self.sent_ttl_ms = sent_ttl_s * 1000
        self._mark_sent_append = redis.register_script(_MARK_SENT_AND_APPEND)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._mark_sent = redis.register_script(_MARK_SENT)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, order_id: int, token: str) -> Claim:
        """Take the order's lease if nobody sent or is sending it."""
        reply: Any = await self._claim(keys=[ledger_key(order_id)], args=[token, self.lease_ms])
        state = ClaimState(text(reply[0]))
        if state is ClaimState.SENT:
            return Claim(state, message_id=text(reply[1]) or None, at=text(reply[2]) or None)
        if state is ClaimState.BUSY:
            return Claim(state, lease_left_ms=max(0, int(reply[1])))
        return Claim(state)

    async def renew(self, order_id: int, token: str) -> bool:
        """Extend the caller's lease; False if it no longer holds it."""
        reply = await self._renew(keys=[ledger_key(order_id)], args=[token, self.lease_ms])
        return bool(int(reply))

    async def mark_sent(self, order_id: int, token: str, message_id: str, at: str) -> bool:
        """Record the order as sent; False if the caller's lease had been lost meanwhile
        (another sender may have sent it too). True again when the caller's own earlier
        mark is found (a retry after a lost reply)."""
        reply = await self._mark_sent(
            keys=[ledger_key(order_id)], args=[token, message_id, at, self.sent_ttl_ms]
        )
        return int(reply) in _HELD

    async def mark_sent_and_append(
        self,
        order_id: int,
        token: str,
        message_id: str,
        at: str,
        *,
        stream: str,
        fields: Sequence[bytes | str],
    ) -> tuple[bool, str | None]:
        """``mark_sent``, then XADD ``fields`` to ``stream``, in ONE script (one round
        trip): the entry is appended only after the record is written, and never if
        that fails, nor when the caller's own earlier call had done both (a retry after
        a lost reply). Returns ``mark_sent``'s answer and the new entry's id (``None``
        for that retry).

        Both keys must live on one server: not for a cluster (different slots).
        """
        reply: Any = await self._mark_sent_append(
            keys=[ledger_key(order_id), stream],
            args=[token, message_id, at, self.sent_ttl_ms, *fields],
        )
        return int(reply[0]) in _HELD, None if reply[1] is None else text(reply[1])

    async def release(self, order_id: int, token: str) -> bool:
        """Give the order back after a failed send; False if the caller did not hold it."""
        reply = await self._release(keys=[ledger_key(order_id)], args=[token])
        return bool(int(reply))
