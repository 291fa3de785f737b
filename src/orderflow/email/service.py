"""The Email Service: a consumer-group worker that sends each order's confirmation once.

For every ``order.created`` entry of the orders stream (or an entry with only ``data``,
from any producer) it validates the order, claims the order in the email ledger,
renders and sends the email, marks the order sent, and publishes ``email.sent`` to the
email-events stream. Invalid orders and permanent SMTP failures publish ``email.failed``
and are dead-lettered; transient failures are retried by the bus with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from orderflow import logs, tracing
from orderflow.bus import (
    TRANSIENT,
    Delivery,
    Message,
    OrderedWorker,
    PartitionedWorker,
    PermanentError,
    Retention,
    StreamPublisher,
    StreamWorker,
    WorkerConfig,
    WorkerStats,
    encode,
)
from orderflow.bus import metrics as bus_metrics
from orderflow.bus.partitions import is_cluster, resolve_layout, single_stream
from orderflow.config import Settings
from orderflow.domain import (
    DATASCHEMA_FIELD,
    EMAIL_FAILED_EVENT,
    EMAIL_SENT_EVENT,
    ORDER_CREATED_EVENT,
    UnsupportedVersion,
    schema_version,
)
from orderflow.email import metrics
from orderflow.email.events import MAX_REASON, EmailFailed
from orderflow.email.gate import SmtpGate
from orderflow.email.journey import DEAD_LETTERED, DUPLICATE, RETRIED, SENT, JourneyRecorder
from orderflow.email.ledger import Claim, ClaimState, EmailLedger, ledger_key
from orderflow.email.order import (
    ORDER_CREATED_VERSIONS,
    InvalidOrder,
    OrderEvent,
    parse_order,
)
from orderflow.email.render import OutgoingEmail, Renderer
from orderflow.email.sender import Sender, SendError, SmtpUnreachable

log = logging.getLogger(__name__)

#: The ``ce_source`` of the events this service publishes.
SOURCE = "orderflow/email"
DEFAULT_CONCURRENCY = 32
#: How long a ledger write waits for a replica on a cluster.
_WAIT_MS = 100

#: Redis out of reach or slow: the bus's one definition.
_REDIS_ERRORS = TRANSIENT


class OrderBusy(Exception):
    """Another live sender holds the order's lease; retry later (it will likely send)."""


class LeaseLost(OrderBusy):
    """The order's lease ran out before the SMTP transaction (a frozen or very slow
    worker); another sender may have it: do not send, retry later (it finds it sent)."""


class EmailService:
    """Consumes orders and sends confirmations, at most once per order in the ledger.

    ``sender`` is the port emails leave through (``SmtpSender`` in production).
    The caller owns ``redis`` and ``sender`` and closes them after :meth:`run`.
    """

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        sender: Sender,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        consumer: str | None = None,
        worker_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.sender = sender
        self.renderer = Renderer(settings.mail_from)
        #: Holds sends (and so consumption) while the SMTP server cannot be reached.
        self.gate = SmtpGate()
        # The lease is the ledger's twin of the bus's claim timeout: a sender silent
        # for that long is presumed dead in both places, so its order and its entry
        # become available again at about the same time.
        self.ledger = EmailLedger(redis, lease_ms=settings.claim_idle_ms)
        #: Each delivery's outcome per order, for the console's journey page.
        self.journey = JourneyRecorder(redis)
        self.publisher = StreamPublisher(redis, retention=Retention(maxlen=settings.stream_maxlen))
        options: dict[str, Any] = {"concurrency": concurrency, **(worker_options or {})}
        if consumer is not None:
            options["consumer"] = consumer
        config = WorkerConfig.from_settings(
            settings, stream=settings.stream, group=settings.group, **options
        )
        self._redis = redis
        #: Keys in different slots: the ledger's record and the event in two steps.
        self._cluster = is_cluster(redis)
        self._worker_config = config
        self.worker: StreamWorker | PartitionedWorker | OrderedWorker = StreamWorker(
            redis, config, self.handle
        )
        # On a cluster the events stream is hash-tagged, so it and its dead letters
        # share a slot (a consumer's dead-lettering is one transaction).
        self.events_stream = single_stream(redis, settings.email_events_stream)
        # Looked up once: labels() per email takes the metric's lock.
        self._published = bus_metrics.PUBLISHED.labels(self.events_stream)
        self._chosen = asyncio.Event()
        #: Cluster nodes found without a replica, not waited for until then.
        self._no_replica_until: dict[str, float] = {}
        self._stop_requested = False
        # Lease tokens: unique per delivery attempt, across processes (64 random bits per
        # service) and within one (a counter), without a uuid4 (a getrandom call) each.
        self._token_salt = secrets.token_hex(8)
        self._tokens = itertools.count()

    @property
    def consumer(self) -> str:
        """This service's consumer name in the group."""
        return self.worker.consumer

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Consume until :meth:`stop`; with ``burst``, until the stream is drained."""
        log.info(
            "email worker %s consuming %s as group %s",
            self.consumer,
            self.settings.stream,
            self.settings.group,
        )
        await self._choose_worker()
        try:
            return await self.worker.run(burst=burst)
        finally:
            await self.journey.close()

    async def _choose_worker(self) -> None:
        # The partition count is agreed through Redis, so it is known only now. The
        # plain single stream keeps the plain StreamWorker made in __init__.
        try:
            layout = await resolve_layout(
                self._redis, self.settings.stream, self.settings.partitions
            )
            if self.settings.ordered:
                self.worker = OrderedWorker(self._redis, layout, self._worker_config, self.handle)
            elif not layout.plain:
                self.worker = PartitionedWorker(
                    self._redis, layout, self._worker_config, self.handle
                )
            if not layout.plain or self.settings.ordered:
                log.info(
                    "%d partitions of %s (%s)",
                    layout.count,
                    self.settings.stream,
                    "ordered: leased" if self.settings.ordered else "competing consumers",
                )
        finally:
            self._chosen.set()
            if self._stop_requested:
                self.worker.stop()

    async def wait_started(self) -> None:
        """Return once the worker reads the stream."""
        await self._chosen.wait()
        await self.worker.wait_started()

    def stop(self) -> None:
        """Stop reading; in-flight sends finish and are acknowledged."""
        self._stop_requested = True
        self.gate.release()
        self.worker.stop()

    # -- handling one entry --------------------------------------------------------

    async def handle(self, delivery: Delivery) -> None:
        """The bus handler: one delivery of an orders-stream entry."""
        message = delivery.message
        if message.type not in (None, ORDER_CREATED_EVENT):
            # Other events on the stream are not ours: acknowledge and move on.
            log.debug("ignoring %s event %s", message.type, message.id)
            return
        try:
            version = schema_version(message.headers.get(DATASCHEMA_FIELD), ORDER_CREATED_EVENT)
        except UnsupportedVersion as exc:
            metrics.FAILED.labels("invalid").inc()
            raise PermanentError(str(exc)) from None
        if version not in ORDER_CREATED_VERSIONS:
            # A producer ahead of this consumer: no retry makes it readable, and no
            # guess at its meaning is safe. Dead-lettered for replay after an upgrade.
            metrics.FAILED.labels("invalid").inc()
            raise PermanentError(
                f"unsupported schema version: {ORDER_CREATED_EVENT} version {version} "
                f"(this Email Service reads {sorted(ORDER_CREATED_VERSIONS)})"
            )
        try:
            order = parse_order(message.data, version)
        except InvalidOrder as exc:
            metrics.FAILED.labels("invalid").inc()
            if exc.order_id is not None:
                await self._publish_failed(exc.order_id, exc.email, exc.reason, None)
                self._step(delivery, exc.order_id, DEAD_LETTERED, exc.reason)
            raise PermanentError(exc.reason) from None
        tracing.attribute(tracing.ORDER_ID, order.id)
        # The sender's place for this order's send is kept until it is recorded sent.
        with logs.order_context(order.id), self.sender.holding():
            try:
                outcome, message_id = await self.gate.run(
                    functools.partial(self._deliver, order, delivery)
                )
            except Exception as exc:
                # What the bus does next: dead-letter it (permanent, or the last delivery),
                # or retry it.
                last = delivery.deliveries >= self.worker.config.max_deliveries
                gone = isinstance(exc, PermanentError) or last
                reason = (
                    str(exc) if isinstance(exc, PermanentError) else f"{type(exc).__name__}: {exc}"
                )
                self._step(delivery, order.id, DEAD_LETTERED if gone else RETRIED, reason)
                raise
            self._step(delivery, order.id, outcome, message_id=message_id)

    def _step(
        self,
        delivery: Delivery,
        order_id: int,
        outcome: str,
        reason: str | None = None,
        *,
        message_id: str | None = None,
    ) -> None:
        """Record this delivery's outcome in the order's journey (buffered, no wait)."""
        self.journey.note(
            order_id,
            consumer=self.consumer,
            stream=delivery.stream,
            entry_id=delivery.entry_id,
            deliveries=delivery.deliveries,
            outcome=outcome,
            reason=reason,
            message_id=message_id,
        )

    async def _deliver(self, order: OrderEvent, delivery: Delivery) -> tuple[str, str]:
        """Claim, send, record; returns the outcome (sent or duplicate) and Message-ID.
        Raises SmtpUnreachable (nothing sent, the lease given back) for the gate to
        hold the delivery until SMTP answers."""
        token = f"{self.consumer}:{self._token_salt}{next(self._tokens):x}"
        with tracing.span("email.ledger claim"):
            claim, leased_at = await self._claim(order, token)
        if claim.state is ClaimState.SENT:
            metrics.DUPLICATES.inc()
            log.debug("order %s: email already sent, not sending again", order.id)
            sent_id = claim.message_id or self.renderer.message_id(order.id)
            await self._publish_sent(order, sent_id, claim.at)
            return DUPLICATE, sent_id
        message_id = self.renderer.message_id(order.id)
        try:
            with tracing.span("email.render"):
                email = self.renderer.render(order)
            await self._send_holding_lease(order, token, email, leased_at)
        except SendError as exc:
            await self._release(order, token)
            if isinstance(exc, SmtpUnreachable) and not self._stop_requested:
                raise
            if exc.permanent:
                metrics.FAILED.labels("rejected").inc()
                await self._publish_failed(order.id, order.email, exc.reason, message_id)
                raise PermanentError(f"order {order.id}: {exc.reason}") from exc
            metrics.DEFERRED.inc()
            if delivery.deliveries >= self.worker.config.max_deliveries:
                # The bus dead-letters it after this; the Order Service must hear of it.
                metrics.FAILED.labels("gave_up").inc()
                reason = f"gave up after {delivery.deliveries} deliveries: {exc.reason}"
                await self._publish_failed(order.id, order.email, reason, message_id)
            raise
        except BaseException:
            await self._release(order, token)
            raise
        at = _now()
        if self._cluster:
            # The ledger key and the events stream live in different slots: two steps,
            # the ledger first (and replicated) so the event never precedes the record.
            await self._mark_sent(order, token, message_id, at)
            metrics.SENT.inc()
            await self._publish_sent(order, message_id, at)
        else:
            await self._mark_sent_and_publish(order, token, message_id, at)
            metrics.SENT.inc()
        return SENT, message_id

    async def _claim(self, order: OrderEvent, token: str) -> tuple[Claim, float]:
        """Claim the order; while another sender holds it, wait for its outcome.

        Also returns when the successful claim was asked for (monotonic): the lease
        cannot run out before that time plus the lease, whatever happens meanwhile.
        """
        deadline = time.monotonic() + self.ledger.lease_ms / 1000 + 1.0
        pause = 0.01
        while True:
            # Taken before asking: a process frozen while the reply arrives must not
            # believe its lease younger than it is.
            asked = time.monotonic()
            claim = await self.ledger.claim(order.id, token)
            if claim.state is ClaimState.CLAIMED:
                await self._replicated(order.id)
            if claim.state is not ClaimState.BUSY:
                return claim, asked
            # Usually the other sender finishes within milliseconds (a duplicate entry
            # or a race); if it died, its lease runs out. Either way, waiting here is
            # cheaper than a retry through the bus, which could give up meanwhile.
            left = deadline - time.monotonic()
            if left <= 0:
                raise OrderBusy(f"order {order.id} is being sent by another worker")
            await asyncio.sleep(min(pause, left, claim.lease_left_ms / 1000 + 0.005))
            pause = min(pause * 2, 0.5)

    async def _replicated(self, order_id: int) -> None:
        """On a cluster, wait until a replica has the order's ledger record (WAIT).

        A failover promotes a replica: a lease it never got would let a second sender
        in while the first still sends, and a lost "sent" mark would send again. If
        the master dies first, WAIT fails and the delivery is retried (nothing sent
        yet, or the send is repeated: the unavoidable window of async replication).
        """
        if not self._cluster:
            return
        cluster: Any = self._redis
        node = cluster.get_node_from_key(ledger_key(order_id))
        if self._no_replica_until.get(node.name, 0.0) > time.monotonic():
            return
        acked = await cluster.execute_command("WAIT", 1, _WAIT_MS, target_nodes=node)
        if not int(acked) and not await self._has_replica(node):
            # No replica to wait for: do not pay the timeout on every order. (A slow
            # replica is waited for every time: skipping it would open a window where
            # a failover loses the record.)
            self._no_replica_until[node.name] = time.monotonic() + 10.0

    async def _has_replica(self, node: Any) -> bool:
        cluster: Any = self._redis
        try:
            info = await cluster.info("replication", target_nodes=node)
        except _REDIS_ERRORS:
            return True
        if isinstance(info, dict) and "connected_slaves" not in info and len(info) == 1:
            info = next(iter(info.values()))
        return int(info.get("connected_slaves", 0)) > 0 if isinstance(info, dict) else True

    async def _send_holding_lease(
        self, order: OrderEvent, token: str, email: OutgoingEmail, leased_at: float
    ) -> None:
        """Send, renewing the order's lease while the send runs, so no one steals it."""
        # The send runs in the handler's own task; a timer starts a renewal only when
        # a send outlasts a third of the lease (rare), so a fast send costs no extra
        # task, future or wait set.
        loop = asyncio.get_running_loop()
        interval = self.ledger.lease_ms / 3000
        renewals: list[asyncio.Task[None]] = []
        timers: list[asyncio.TimerHandle] = []

        def renew_due() -> None:
            if not renewals or renewals[-1].done():
                renewals.append(asyncio.create_task(self._renew(order, token)))
            timers[0] = loop.call_later(interval, renew_due)

        timers.append(loop.call_later(interval, renew_due))
        started = time.perf_counter()
        try:
            guard = functools.partial(self._still_holding, order, token, leased_at)
            await self.sender.send(email, before_transaction=guard)
        finally:
            timers[0].cancel()
            metrics.SEND_SECONDS.observe(time.perf_counter() - started)
            for renewal in renewals:
                if not renewal.done():
                    renewal.cancel()
                with contextlib.suppress(BaseException):
                    await renewal

    async def _renew(self, order: OrderEvent, token: str) -> None:
        try:
            held = await self.ledger.renew(order.id, token)
        except _REDIS_ERRORS as exc:
            log.warning("order %s: could not renew the send lease: %s", order.id, exc)
            return
        if not held:
            log.warning(
                "order %s: send lease lost while sending; another worker may send "
                "a duplicate (Message-ID %s)",
                order.id,
                self.renderer.message_id(order.id),
            )

    async def _still_holding(self, order: OrderEvent, token: str, since: float) -> None:
        """Just before the SMTP transaction: if enough time has passed since the lease
        was asked for (``since``) for it to be at risk (the process was frozen, the
        connection was slow), check that it is still ours, renewing it. Costs nothing
        on a fast send."""
        if time.monotonic() - since < self.ledger.lease_ms / 3000:
            return
        if not await self.ledger.renew(order.id, token):
            raise LeaseLost(
                f"order {order.id}: send lease lost before the SMTP transaction; not sending"
            )

    async def _mark_sent(self, order: OrderEvent, token: str, message_id: str, at: str) -> None:
        async def mark() -> bool:
            held = await self.ledger.mark_sent(order.id, token, message_id, at)
            await self._replicated(order.id)
            return held

        if not await self._recorded(order, mark):
            self._warn_lease_lost(order, message_id)

    async def _mark_sent_and_publish(
        self, order: OrderEvent, token: str, message_id: str, at: str
    ) -> None:
        """``_mark_sent`` and ``_publish_sent`` in one round trip (a single server)."""
        event = Message.event(
            EMAIL_SENT_EVENT,
            self._sent_data(order, message_id, at),
            source=SOURCE,
            headers=tracing.headers(),
        )
        fields: list[bytes | str] = []
        for key, value in encode(event).items():
            fields += (key, value)
        appended: list[str | None] = []

        async def mark_and_append() -> bool:
            # A retry after a lost reply finds its own record and appends nothing again
            # (entry id None).
            held, entry_id = await self.ledger.mark_sent_and_append(
                order.id, token, message_id, at, stream=self.events_stream, fields=fields
            )
            appended.append(entry_id)
            return held

        held = await self._recorded(order, mark_and_append)
        if appended[-1] is not None:
            self._published.inc()
            # The publisher's retention (a trim check every so many entries) still applies.
            await self.publisher.appended(self.events_stream, 1)
        if not held:
            self._warn_lease_lost(order, message_id)

    @staticmethod
    async def _recorded(order: OrderEvent, record: Callable[[], Awaitable[bool]]) -> bool:
        """``record()`` (the ledger's "sent"), retried through a short Redis outage:
        SMTP accepted the email, and the record is what keeps a retry from sending it
        again, so riding out the outage beats failing the delivery. Returns its answer."""
        delay = 0.05
        for _ in range(11):
            with contextlib.suppress(*_REDIS_ERRORS):
                return await record()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:
            return await record()
        except _REDIS_ERRORS as exc:
            log.error("order %s: email sent but not recorded: %s", order.id, exc)
            raise

    @staticmethod
    def _warn_lease_lost(order: OrderEvent, message_id: str) -> None:
        log.warning(
            "order %s: lease had expired before the send was recorded; a duplicate "
            "may exist (Message-ID %s)",
            order.id,
            message_id,
        )

    async def _release(self, order: OrderEvent, token: str) -> None:
        # Best effort: if Redis is away the lease simply runs out.
        try:
            await self.ledger.release(order.id, token)
        except _REDIS_ERRORS as exc:
            log.warning("order %s: could not release the send lease: %s", order.id, exc)

    # -- outcome events ------------------------------------------------------------

    @staticmethod
    def _sent_data(order: OrderEvent, message_id: str, at: str | None) -> dict[str, Any]:
        # EmailSent's payload (its fields, in its order) built directly: every value is
        # one the model would pass as it is (a validated order's id and address, our own
        # Message-ID and time), and its validation and dump were ~2% of the worker's CPU
        # per email. tests/contracts checks what is published against the document.
        return {
            "order_id": order.id,
            "email": order.email,
            "message_id": message_id,
            "at": at or _now(),
        }

    async def _publish_sent(self, order: OrderEvent, message_id: str, at: str | None) -> None:
        data = self._sent_data(order, message_id, at)
        await self.publisher.publish(
            self.events_stream,
            Message.event(EMAIL_SENT_EVENT, data, source=SOURCE, headers=tracing.headers()),
        )

    async def _publish_failed(
        self, order_id: int, email: str | None, reason: str, message_id: str | None
    ) -> None:
        data = EmailFailed(
            order_id=order_id,
            email=email,
            reason=reason[:MAX_REASON],
            message_id=message_id,
            at=_now(),
        ).data()
        await self.publisher.publish(
            self.events_stream,
            Message.event(EMAIL_FAILED_EVENT, data, source=SOURCE, headers=tracing.headers()),
        )
        log.warning("order %s: email failed: %s", order_id, reason)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
