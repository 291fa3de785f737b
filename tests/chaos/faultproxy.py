"""A small asyncio TCP fault proxy: latency, connection resets, a peer that stops answering.

It sits between a client (an email worker) and a server (Redis, SMTP) and forwards
bytes both ways, unless told to misbehave:

* ``latency_s``: each chunk is held that long before it is forwarded (order is kept);
* :meth:`reset_all`: every open connection is reset (RST, not FIN) mid-stream, so a
  command in flight gets no reply; ``refuse`` resets new connections at once;
* ``blackhole``: the proxy keeps connections open but drops every byte both ways, as a
  dead host behind a load balancer does: the client only finds out by timing out.

Given a :class:`FaultLog`, it records what it did to whom. In front of SMTP
(``smtp=True``): the connections it reset and those whose server reply it dropped, by
the port its upstream side used (the client port the server saw). In front of Redis:
the orders whose "sent" record (the ledger command carrying ``<order-N@…>``) it
dropped, or left unanswered on a connection it reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

from .accounting import FaultLog, recorded_orders


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; faults are switched at run time."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        port: int = 0,
        faults: FaultLog | None = None,
        name: str = "proxy",
        smtp: bool = False,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = faults
        self.name = name
        #: In front of SMTP: cuts are recorded (in front of Redis: dropped ledger keys).
        self.smtp = smtp
        self.port = port
        self.latency_s = 0.0
        self.blackhole = False
        self.refuse = False
        #: Connections accepted and connections reset, for the figures.
        self.accepted = 0
        self.resets = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        #: In front of Redis: per connection, the bytes sent since its last reply (the
        #: commands a reset leaves without an answer; bounded).
        self._unanswered: dict[tuple[asyncio.StreamWriter, asyncio.StreamWriter], bytes] = {}
        #: Pairs whose server reply was dropped (recorded once each).
        self._dropped_reply: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, scheme: str, path: str = "") -> str:
        """The URL a client uses to reach the upstream through the proxy."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        """Listen (a free port when ``port`` is 0)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        self.reset_all(record=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def heal(self) -> None:
        """No more faults."""
        self.latency_s = 0.0
        self.blackhole = False
        self.refuse = False

    def reset_all(self, *, record: bool = True) -> int:
        """Reset every open connection now; returns how many were reset. The cuts are
        recorded as faults unless ``record`` is False (the proxy's own shutdown)."""
        pairs = list(self._pairs)
        self._pairs.clear()
        if self.faults is not None and record and pairs:
            now = time.monotonic()
            if self.smtp:
                ports = [_local_port(upstream) for _, upstream in pairs]
                self.faults.cut(f"{self.name} reset", now, ports)
            else:
                for pair in pairs:
                    for order_id in recorded_orders(self._unanswered.pop(pair, b"")):
                        self.faults.dropped_records.append((order_id, now, f"{self.name} reset"))
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        self.resets += len(pairs)
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refuse:
            self.resets += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, target, reply in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pump(source, target, pair, reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        reply: bool,
    ) -> None:
        try:
            while True:
                chunk = await source.read(65536)
                if not chunk:
                    break
                if not self.smtp:
                    self._note(chunk, pair, reply)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if self.blackhole:
                    self._dropped(chunk, pair, reply)
                    continue  # dropped: the peer never answers this
                target.write(chunk)
                await target.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other too (FIN), as a real proxy would.
            if pair in self._pairs:
                self._pairs.discard(pair)
                self._unanswered.pop(pair, None)
                for side in pair:
                    with contextlib.suppress(OSError, RuntimeError):
                        side.close()

    def _note(
        self, chunk: bytes, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], reply: bool
    ) -> None:
        """Keep what was sent on ``pair`` since its last reply (a reset loses it)."""
        if reply:
            self._unanswered.pop(pair, None)
        else:
            self._unanswered[pair] = (self._unanswered.get(pair, b"") + chunk)[-_KEEP:]

    def _dropped(
        self, chunk: bytes, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], reply: bool
    ) -> None:
        if self.faults is None:
            return
        if not self.smtp:
            if reply:
                return
            now = time.monotonic()
            for order_id in recorded_orders(chunk):
                self.faults.dropped_records.append((order_id, now, f"{self.name} silent"))
        elif reply and pair not in self._dropped_reply:
            self._dropped_reply.add(pair)
            port = _local_port(pair[1])
            self.faults.cut(f"{self.name} dropped a reply", time.monotonic(), [port])


#: Bytes of unanswered commands kept per connection: a few records' worth.
_KEEP = 16384


def _local_port(writer: asyncio.StreamWriter) -> int:
    sockname = writer.get_extra_info("sockname")
    return int(sockname[1]) if sockname else 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a connection reset (RST)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
