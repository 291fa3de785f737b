"""A general aiosmtpd SMTP server in the running event loop, for any aiosmtpd handler.

Tests use it with handlers of their own (a server that refuses, stalls or asks for
AUTH); the SMTP sink (:mod:`orderflow.embedded.smtp_sink`) builds on it. Nothing is
started at import time.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Self

from aiosmtpd.smtp import SMTP

from orderflow.config import DEFAULT_SINK_PORT
from orderflow.embedded.smtp_session import DATA_SIZE_LIMIT

log = logging.getLogger(__name__)


class _TrackedSMTP(SMTP):
    """An aiosmtpd session that leaves its server's set of sessions when it ends."""

    def __init__(self, handler: Any, sessions: set[SMTP], **options: Any) -> None:
        super().__init__(handler, **options)
        self._tracked_in = sessions

    def connection_lost(self, error: Exception | None) -> None:
        self._tracked_in.discard(self)
        super().connection_lost(error)


class SmtpServer:
    """An aiosmtpd server in the running event loop, for any aiosmtpd ``handler``.

    Unlike a bare ``asyncio.Server``, :meth:`stop` also closes open client
    connections, so stopping really makes the server unreachable.
    """

    def __init__(
        self,
        handler: Any,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_SINK_PORT,
        hostname: str = "orderflow.localhost",
        ssl_context: ssl.SSLContext | None = None,
        **smtp_options: Any,
    ) -> None:
        self.handler = handler
        #: TLS from the first byte (``smtps://``); for STARTTLS pass ``tls_context``.
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.hostname = hostname
        self._options: dict[str, Any] = {
            "enable_SMTPUTF8": True,
            "data_size_limit": DATA_SIZE_LIMIT,
            **smtp_options,
        }
        self._server: asyncio.Server | None = None
        self._sessions: set[Any] = set()

    @property
    def url(self) -> str:
        """The ``smtp://`` URL clients connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "smtps" if self.ssl_context is not None else "smtp"
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while it accepts connections."""
        return self._server is not None

    def _protocol(self) -> asyncio.Protocol:
        protocol = _TrackedSMTP(
            self.handler,
            self._sessions,
            hostname=self.hostname,
            loop=asyncio.get_running_loop(),
            **self._options,
        )
        self._sessions.add(protocol)
        return protocol

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, then ``port`` is it)."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, ssl=self.ssl_context
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("SMTP server listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening and close every open client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
