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

On a single server the hot transitions (claim; mark sent + ``email.sent``) of every
order asked for in the same turn of the event loop go to Redis in one script call
(:class:`_Batch`): the worker's lanes, woken together by the same replies, claim and
mark together, one round trip and one command to pack instead of one per order. The
script runs each order's transition as the one-order script does, one after the other.
On a cluster the orders' keys live in different slots: one call per order.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orderflow.bus.entries import text
from orderflow.bus.partitions import is_cluster
from orderflow.bus.streams import send_commands

#: Prefix of the ledger's keys; the full key is ``orderflow:email:{<order id>}``.
KEY_PREFIX = "orderflow:email:"
#: How long a ``sent`` record is kept: duplicates older than this would send again.
SENT_TTL_S = 30 * 24 * 3600

# One order's claim: {'claimed'} | {'sent', message_id, at} | {'busy', pttl}. The
# caller's own lease (its claim retried after a lost reply) is still its own: renewed.
_CLAIM_FUNCTION = """
local function claim(key, token, lease)
  local rec = redis.call('HMGET', key, 'state', 'message_id', 'at', 'token')
  if rec[1] == 'sent' then return {'sent', rec[2] or '', rec[3] or ''} end
  if rec[1] == 'sending' and rec[4] ~= token then
    return {'busy', tostring(redis.call('PTTL', key))}
  end
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'sending', 'token', token)
  redis.call('PEXPIRE', key, lease)
  return {'claimed'}
end
"""

# KEYS[1] ledger key; ARGV token, lease ms.
_CLAIM = _CLAIM_FUNCTION + "return claim(KEYS[1], ARGV[1], ARGV[2])\n"

# KEYS the orders' ledger keys; ARGV lease ms, then one token per key. Every order's
# claim, in one script call: {claim reply, ...} in the order of KEYS.
_CLAIM_MANY = (
    _CLAIM_FUNCTION
    + """
local replies = {}
for i, key in ipairs(KEYS) do replies[i] = claim(key, ARGV[i + 1], ARGV[1]) end
return replies
"""
)

# KEYS[1]; ARGV token, lease ms. 1 if the caller still holds the lease (renewed).
_RENEW = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'token')
if rec[1] == 'sending' and rec[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# The email was accepted by SMTP, so the order is sent whoever holds the lease now; the
# record keeps the token of a sender that held the lease. Returns 1 if the caller held
# the lease, 0 if its lease had been lost (another sender may have sent too), 2 if it was
# marked sent already, 3 if the caller itself had marked it holding the lease (a retry
# whose first reply was lost).
_MARK_FUNCTION = """
local function mark(key, token, message_id, at, ttl)
  local rec = redis.call('HMGET', key, 'state', 'token')
  if rec[1] == 'sent' then
    if rec[2] == token then return 3 end
    return 2
  end
  local held = rec[1] == 'sending' and rec[2] == token
  redis.call('DEL', key)
  redis.call('HSET', key, 'state', 'sent', 'message_id', message_id, 'at', at,
    'token', held and token or '')
  redis.call('PEXPIRE', key, ttl)
  if held then return 1 end
  return 0
end
"""

# KEYS[1]; ARGV token, message id, at, ttl ms.
_MARK_SENT = _MARK_FUNCTION + "return mark(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])\n"

# KEYS[1] ledger key, KEYS[2] a stream; ARGV token, message id, at, ttl ms, then the
# entry's field/value pairs. The mark, then XADD the entry (the email.sent event): the
# event is appended only once the record is written, and not again by a retry of the
# same sender (3). Returns {mark, entry id or false}.
_MARK_SENT_AND_APPEND = (
    _MARK_FUNCTION
    + """
local marked = mark(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if marked == 3 then return {marked, false} end
return {marked, redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))}
"""
)

# KEYS the orders' ledger keys, then the stream; ARGV ttl ms, then per key: token,
# message id, at, the entry's field count n, its n fields (name, value ...). Each
# order's mark and append as above, one order after the other, in one script call:
# {{mark, entry id or false}, ...} in the order of KEYS.
_MARK_SENT_AND_APPEND_MANY = (
    _MARK_FUNCTION
    + """
local stream = KEYS[#KEYS]
local pos = 2
local replies = {}
for i = 1, #KEYS - 1 do
  local n = tonumber(ARGV[pos + 3])
  local marked = mark(KEYS[i], ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[1])
  if marked == 3 then
    replies[i] = {marked, false}
  else
    replies[i] = {marked, redis.call('XADD', stream, '*', unpack(ARGV, pos + 4, pos + 3 + n))}
  end
  pos = pos + 4 + n
end
return replies
"""
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


_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")

#: Orders per batched script call; a longer batch is split (Lua's unpack has a limit).
BATCH_LIMIT = 200


class _Batch(Generic[_Request, _Reply]):
    """Requests made in one turn of the event loop, sent together.

    The first request of a turn starts a task, which runs after every task that the loop
    had ready in that turn (the lanes woken by the same replies), so their requests go
    in one call of ``send``. ``send`` answers each request with its reply or the
    exception that request raises. A caller cancelled before the call goes out is left
    out of it.
    """

    def __init__(
        self, send: Callable[[list[_Request]], Awaitable[list[_Reply | Exception]]]
    ) -> None:
        self._send = send
        self._waiting: list[tuple[_Request, asyncio.Future[_Reply]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, request: _Request) -> _Reply:
        """``request``'s reply, once its batch is answered."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Reply] = loop.create_future()
        self._waiting.append((request, future))
        if len(self._waiting) == 1:
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        batch = [(request, future) for request, future in batch if not future.done()]
        for start in range(0, len(batch), BATCH_LIMIT):
            part = batch[start : start + BATCH_LIMIT]
            try:
                replies = await self._send([request for request, _ in part])
            except asyncio.CancelledError:
                for _, future in batch[start:]:
                    future.cancel()
                raise
            except Exception as exc:
                replies = [exc] * len(part)
            for (_, future), reply in zip(part, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)


#: A batched claim: order id, token.
_ClaimRequest = tuple[int, str]
#: A batched mark + append: order id, token, message id, at, stream, fields.
_MarkRequest = tuple[int, str, str, str, str, Sequence[bytes | str]]


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
        self._redis = redis
        self._mark_sent_append = redis.register_script(_MARK_SENT_AND_APPEND)
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._mark_sent = redis.register_script(_MARK_SENT)
        self._release = redis.register_script(_RELEASE)
        #: Whether claims and marks are batched (a single server: one slot for all keys).
        self.batched = not is_cluster(redis)
        self._claims: _Batch[_ClaimRequest, Claim] = _Batch(self._claim_batch)
        self._marks: _Batch[_MarkRequest, tuple[bool, str | None]] = _Batch(self._mark_batch)

    async def claim(self, order_id: int, token: str) -> Claim:
        """Take the order's lease if nobody sent or is sending it (the caller's own
        lease, a claim retried with its token, is still the caller's: renewed)."""
        request = (order_id, token)
        if self.batched:
            return await self._claims.submit(request)
        return await self._claim_one(request)

    async def _claim_one(self, request: _ClaimRequest) -> Claim:
        order_id, token = request
        reply: Any = await self._claim(keys=[ledger_key(order_id)], args=[token, self.lease_ms])
        return _claim_of(reply)

    async def _claim_batch(self, requests: list[_ClaimRequest]) -> list[Claim | Exception]:
        # A batch of one too: packed by hiredis, cheaper than redis-py's EVALSHA.
        keys = [ledger_key(order_id) for order_id, _ in requests]
        command = ("EVAL", _CLAIM_MANY, len(keys), *keys, self.lease_ms)
        try:
            (replies,) = await send_commands(
                self._redis, [command + tuple(token for _, token in requests)]
            )
        except ResponseError:
            # One order's key is not a ledger record (its error would be every order's):
            # each on its own, so only that one fails. Orders claimed before the error
            # are claimed again with the same token: still the caller's.
            return await _one_by_one(requests, self._claim_one)
        return [_claim_of(reply) for reply in replies]

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
        request = (order_id, token, message_id, at, stream, fields)
        if self.batched:
            return await self._marks.submit(request)
        return await self._mark_one(request)

    async def _mark_one(self, request: _MarkRequest) -> tuple[bool, str | None]:
        order_id, token, message_id, at, stream, fields = request
        reply: Any = await self._mark_sent_append(
            keys=[ledger_key(order_id), stream],
            args=[token, message_id, at, self.sent_ttl_ms, *fields],
        )
        return _marked(reply)

    async def _mark_batch(
        self, requests: list[_MarkRequest]
    ) -> list[tuple[bool, str | None] | Exception]:
        streams = {request[4] for request in requests}
        if len(streams) > 1:
            return await _one_by_one(requests, self._mark_one)
        keys = [ledger_key(request[0]) for request in requests]
        args: list[Any] = [self.sent_ttl_ms]
        for _, token, message_id, at, _, fields in requests:
            args += (token, message_id, at, len(fields), *fields)
        command = ("EVAL", _MARK_SENT_AND_APPEND_MANY, len(keys) + 1, *keys, streams.pop(), *args)
        try:
            (replies,) = await send_commands(self._redis, [command])
        except ResponseError:
            # As for claims: each on its own. Orders marked before the error find their
            # own mark (3) and append nothing again.
            return await _one_by_one(requests, self._mark_one)
        return [_marked(reply) for reply in replies]

    async def release(self, order_id: int, token: str) -> bool:
        """Give the order back after a failed send; False if the caller did not hold it."""
        reply = await self._release(keys=[ledger_key(order_id)], args=[token])
        return bool(int(reply))


def _claim_of(reply: Any) -> Claim:
    state = ClaimState(text(reply[0]))
    if state is ClaimState.SENT:
        return Claim(state, message_id=text(reply[1]) or None, at=text(reply[2]) or None)
    if state is ClaimState.BUSY:
        return Claim(state, lease_left_ms=max(0, int(reply[1])))
    return _CLAIMED


_CLAIMED = Claim(ClaimState.CLAIMED)


def _marked(reply: Any) -> tuple[bool, str | None]:
    return int(reply[0]) in _HELD, None if reply[1] is None else text(reply[1])


async def _one_by_one(
    requests: Sequence[_Request], call: Callable[[_Request], Awaitable[_Reply]]
) -> list[_Reply | Exception]:
    """Each request in its own call: its reply, or the exception it raised."""
    replies: list[_Reply | Exception] = []
    for request in requests:
        try:
            replies.append(await call(request))
        except Exception as exc:
            replies.append(exc)
    return replies
