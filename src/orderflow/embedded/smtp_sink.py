"""The embedded SMTP sink: every message delivered into a Maildir, durably.

``orderflow up`` runs the sink when no SMTP server is configured, so confirmation
emails land in ``<data dir>/mail/new`` where a person (or a test) can read them
(with :mod:`orderflow.maildir`). Its pieces: the sessions speak the sink's own SMTP
(:mod:`~orderflow.embedded.smtp_session`), the messages are written by
:mod:`~orderflow.embedded.maildir_writer`, and the listening and stopping is
:class:`~orderflow.embedded.smtp_server.SmtpServer`'s. Everything runs in the
caller's event loop: nothing is started at import time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orderflow.config import DEFAULT_SINK_PORT
from orderflow.embedded.maildir_writer import MaildirHandler
from orderflow.embedded.smtp_server import SmtpServer
from orderflow.embedded.smtp_session import SinkSession


class SmtpSink(SmtpServer):
    """The embedded sink: an SMTP server (SMTPUTF8 on) delivering into ``maildir``.

    Its sessions are :class:`SinkSession`, not aiosmtpd's (why: see
    :mod:`~orderflow.embedded.smtp_session`).
    """

    def __init__(
        self,
        maildir: Path,
        host: str = "127.0.0.1",
        port: int = DEFAULT_SINK_PORT,
        *,
        fsync: bool = True,
        flush_in_thread: bool = False,
    ) -> None:
        self.maildir = Path(maildir)
        handler = MaildirHandler(self.maildir, fsync=fsync, flush_in_thread=flush_in_thread)
        super().__init__(handler, host=host, port=port)

    def _protocol(self) -> asyncio.Protocol:
        return SinkSession(
            self.handler,
            self._sessions,
            hostname=self.hostname,
            data_size_limit=self._options["data_size_limit"],
        )

    @property
    def delivered(self) -> int:
        """Messages delivered since start."""
        handler: MaildirHandler = self.handler
        return handler.delivered
