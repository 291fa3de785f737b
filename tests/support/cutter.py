"""A TCP proxy in front of Redis that cuts the connections carrying chosen commands.

A worker's loops share one client, so stopping Redis fails them all at once. Behind
this proxy only the named commands fail (``cutter.cut = {b"XACK"}``): the connection
that sends one is closed before the command reaches Redis, so the client gets
"Connection closed by server." for it, as in a real outage, while every other command
goes through. ``cutter.cut = set()`` heals it.

``cutter.hold = {b"XREADGROUP"}`` instead leaves the connection that sends one open
but silent: the command never reaches Redis and no reply comes, as with a server that
stopped answering (the client waits as long as its socket timeout, which the worker's
client has not got). ``cutter.release()`` lets the commands held so far through (their
replies then come as usual), ``cutter.release(cut=True)`` cuts their connections
instead (a command lost on its way); ``hold`` still holds the next ones until emptied.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis


@dataclass
class _Gate:
    """Where held commands wait: opened by a release, which says whether to cut them."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    cut: bool = False


class CommandCutter:
    """Forwards ``127.0.0.1:<port>`` to Redis at ``upstream_port``, cutting ``cut``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        #: Command names (upper case) whose connection is cut when one is sent.
        self.cut: set[bytes] = set()
        #: How many commands were cut, per name.
        self.cuts: dict[bytes, int] = {}
        #: Command names whose connection goes silent when one is sent.
        self.hold: set[bytes] = set()
        #: How many commands were held, per name.
        self.held: dict[bytes, int] = {}
        self._gate = _Gate()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The Redis URL a client uses to go through the proxy."""
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> aioredis.Redis:
        """A client (bytes) that goes through the proxy. Not ``orderflow.bus.connect``:
        its synchronous cluster probe blocks this event loop, so the proxy cannot answer
        it and every client waited out the probe's 1 s timeout first."""
        return aioredis.Redis.from_url(self.url)

    def release(self, *, cut: bool = False) -> None:
        """Let the commands held so far through, or with ``cut`` close their connections
        (counted in ``cuts``)."""
        gate, self._gate = self._gate, _Gate()
        gate.cut = cut
        gate.opened.set()

    async def __aenter__(self) -> CommandCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pair = (writer, up_writer)
        self._writers.update(pair)
        for source, target, check in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(source, target, pair, check))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _to_cut(self, chunk: bytes, names: set[bytes] | None = None) -> bytes | None:
        # A command is a RESP array of bulk strings: its name is "$<len>\r\n<NAME>\r\n".
        upper = chunk.upper()
        for name in self.cut if names is None else names:
            if f"${len(name)}\r\n".encode() + name + b"\r\n" in upper:
                return name
        return None

    async def _pump(
        self,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        check: bool,
    ) -> None:
        try:
            while chunk := await source.read(65536):
                name = self._to_cut(chunk) if check else None
                if name is not None:
                    self.cuts[name] = self.cuts.get(name, 0) + 1
                    break
                held = self._to_cut(chunk, self.hold) if check else None
                if held is not None:
                    self.held[held] = self.held.get(held, 0) + 1
                    # Silent until released, or until the proxy closes (its tasks are
                    # cancelled).
                    gate = self._gate
                    await gate.opened.wait()
                    if gate.cut:
                        self.cuts[held] = self.cuts.get(held, 0) + 1
                        break
                target.write(chunk)
                await target.drain()
        except OSError:
            pass
        finally:
            for writer in pair:
                self._writers.discard(writer)
                writer.transport.abort()
            with contextlib.suppress(OSError):
                await target.wait_closed()
