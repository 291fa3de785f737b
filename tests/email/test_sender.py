"""The SMTP adapter against real aiosmtpd servers: pooling, reconnects, TLS, auth, errors."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from orderflow._compat.aiosmtplib import PIPELINING
from orderflow.config import ConfigError
from orderflow.email import (
    PermanentSendError,
    Renderer,
    SmtpConfig,
    SmtpSender,
    TransientSendError,
    parse_order,
)
from orderflow.embedded.smtp_server import SmtpServer

from .conftest import RecordingHandler, SmtpFixture

RENDERER = Renderer("orderflow <orders@orderflow.localhost>")


async def send(sender: SmtpSender, order_id: int, email: str = "alice@example.com") -> None:
    order = parse_order({"id": order_id, "email": email, "total": 1})
    await sender.send(RENDERER.render(order))


async def test_connections_are_reused_and_bounded(smtp: SmtpFixture) -> None:
    sender = SmtpSender(smtp.url, pool_size=3)
    try:
        for n in range(5):
            await send(sender, n + 1)
        assert sender.connections_opened == 1
        smtp.handler.delay_s = 0.01
        await asyncio.gather(*(send(sender, n) for n in range(10, 40)))
        assert sender.connections_opened <= 3
    finally:
        await sender.close()
    assert len(smtp.handler.received) == 35


async def test_a_dropped_pooled_connection_is_replaced_transparently(smtp: SmtpFixture) -> None:
    sender = SmtpSender(smtp.url, pool_size=1)
    try:
        await send(sender, 1)
        await smtp.down()  # closes the pooled connection too
        await smtp.up()
        await send(sender, 2)
    finally:
        await sender.close()
    assert sender.connections_opened == 2
    assert len(smtp.handler.received) == 2


async def test_connection_refused_is_transient(smtp: SmtpFixture) -> None:
    await smtp.down()
    sender = SmtpSender(smtp.url)
    with pytest.raises(TransientSendError, match="connect"):
        await send(sender, 1)
    await sender.close()


async def test_utf8_address_without_smtputf8_is_permanent() -> None:
    handler = RecordingHandler()
    async with SmtpServer(handler, port=0, enable_SMTPUTF8=False) as server:
        sender = SmtpSender(server.url)
        with pytest.raises(PermanentSendError, match="SMTPUTF8"):
            await send(sender, 1, "ünïcode@example.com")
        # An IDNA domain needs no SMTPUTF8.
        await send(sender, 2, "bob@exämple.com")
        await sender.close()
    assert [r.rcpt_tos for r in handler.received] == [["bob@xn--exmple-cua.com"]]


def _authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data == (b"mailer", b"p@ss:w/rd")
    return AuthResult(success=ok, handled=False)


class _AuthRecorder(RecordingHandler):
    """Records whether each message came from an authenticated session."""

    def __init__(self) -> None:
        super().__init__()
        self.authenticated: list[bool] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.authenticated.append(bool(session.authenticated))
        return await super().handle_DATA(server, session, envelope)


async def test_credentials_come_from_the_url_and_stay_secret() -> None:
    handler = _AuthRecorder()
    # AUTH offered without TLS, for the test only (aiosmtpd refuses it otherwise).
    server = SmtpServer(handler, port=0, authenticator=_authenticator, auth_require_tls=False)
    await server.start()
    try:
        base = f"mailer:{{}}@127.0.0.1:{server.port}"
        sender = SmtpSender("smtp://" + base.format("p%40ss%3Aw%2Frd"))
        assert "p%40ss" not in sender.url
        assert "***" in sender.url
        await send(sender, 1)
        await sender.close()
        wrong = SmtpSender("smtp://" + base.format("wrong"))
        # A configuration problem, not this email's: retried, never dropped.
        with pytest.raises(TransientSendError, match="535"):
            await send(wrong, 2)
        await wrong.close()
    finally:
        await server.stop()
    assert handler.authenticated == [True]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (skips without the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


class _TlsRecorder(RecordingHandler):
    """Records whether each message came over TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.tls: list[bool] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.tls.append(session.ssl is not None or server.transport is None)
        return await super().handle_DATA(server, session, envelope)


async def test_starttls_is_used_when_offered(certificate: tuple[Path, Path]) -> None:
    handler = _TlsRecorder()
    async with SmtpServer(
        handler, port=0, tls_context=_server_context(certificate), require_starttls=True
    ) as server:
        # require_starttls: the server refuses mail until the client upgraded.
        sender = SmtpSender(server.url + "?verify=false")
        await send(sender, 1)
        await sender.close()
    assert handler.tls == [True]
    assert len(handler.received) == 1


async def test_smtps_is_tls_from_the_start(certificate: tuple[Path, Path]) -> None:
    handler = RecordingHandler()
    async with SmtpServer(handler, port=0, ssl_context=_server_context(certificate)) as server:
        assert server.url.startswith("smtps://")
        sender = SmtpSender(server.url + "?verify=false&timeout=5")
        await send(sender, 1)
        await sender.close()
        # Certificates are verified unless told otherwise: a self-signed one fails.
        strict = SmtpSender(server.url + "?timeout=5")
        with pytest.raises(TransientSendError):
            await send(strict, 2)
        await strict.close()
    assert len(handler.received) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://mail.example.com", "smtp:// or smtps://"),
        ("smtp://", "no host"),
        ("smtp://host:99999", "invalid"),
        ("smtp://host?timeout=soon", "timeout"),
        ("smtp://host?verify=maybe", "verify"),
        ("smtp://host?pool=3", "unknown"),
    ],
)
def test_bad_smtp_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SmtpConfig.from_url(url)


def test_smtp_url_defaults() -> None:
    plain = SmtpConfig.from_url("smtp://u:p@mail.example.com")
    assert (plain.port, plain.use_tls, plain.username, plain.password) == (25, False, "u", "p")
    tls = SmtpConfig.from_url("smtps://mail.example.com")
    assert (tls.port, tls.use_tls, tls.username, tls.validate_certs) == (465, True, None, True)


# -- PIPELINING: MAIL, RCPT and DATA in one write, then the content ---------------------


class _PipeliningServer:
    """A scripted SMTP server that offers PIPELINING. With orderflow's pipelining on, it
    answers a transaction only once MAIL, RCPT and DATA are all in (a client waiting for
    each reply would hang); with it off (``ORDERFLOW_COMPAT``), each command as it comes."""

    def __init__(self, replies: dict[str, bytes] | None = None, **options: Any) -> None:
        self.pipelined = PIPELINING.enabled
        self.replies = {
            "MAIL": b"250 OK\r\n",
            "RCPT": b"250 OK\r\n",
            "DATA": b"354 go ahead\r\n",
            "END": b"250 accepted\r\n",
            **(replies or {}),
        }
        self.options = options
        self.messages: list[bytes] = []
        self.connections = 0
        #: What the client did wrong; raised at exit, since a raise in a session task
        #: would only be logged by asyncio and end the connection.
        self.errors: list[object] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        scheme = "smtps" if self.options.get("ssl") else "smtp"
        return f"{scheme}://127.0.0.1:{port}?verify=false&timeout=2"

    async def __aenter__(self) -> _PipeliningServer:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0, **self.options)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        assert self.errors == [], self.errors

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted ESMTP\r\n")
        try:
            await reader.readline()  # EHLO
            writer.write(b"250-scripted\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n")
            while True:
                first = await reader.readline()
                if not first or first.upper().startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
                    return
                commands = [first]
                if self.pipelined:
                    commands += [await reader.readline(), await reader.readline()]
                # Each reply in its own write: the client must take replies as they come.
                for at, verb in enumerate(("MAIL", "RCPT", "DATA")):
                    if at == len(commands):
                        commands.append(await reader.readline())
                    if not commands[at]:
                        return  # the client gave up (a refused MAIL, without pipelining)
                    if commands[at].split(b":")[0].split()[0] != verb.encode():
                        self.errors.append(commands)
                        return
                    reply = self.replies[verb]
                    if reply == b"CLOSE":
                        writer.close()
                        return
                    if reply.startswith(b"SLEEP"):
                        await asyncio.sleep(float(reply.split()[1]))  # a stalled server
                        return
                    writer.write(reply)
                    await writer.drain()
                if not self.replies["DATA"].startswith(b"354"):
                    continue
                message = await reader.readuntil(b"\r\n.\r\n")
                if self.replies["END"].startswith(b"250"):
                    self.messages.append(message)  # accepted
                writer.write(self.replies["END"])
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def test_pipelined_transaction_sends_and_reuses_the_connection() -> None:
    # A multi-line reply, split over writes, is one reply.
    async with _PipeliningServer({"MAIL": b"250-sender\r\n250 OK\r\n"}) as server:
        sender = SmtpSender(server.url)
        await send(sender, 1)
        await send(sender, 2, "ünï@example.com")  # SMTPUTF8 over the same connection
        await sender.close()
    assert sender.connections_opened == server.connections == 1
    first, second = server.messages
    assert b"Message-ID: <order-1@orderflow.localhost>" in first
    assert first.endswith(b"\r\n.\r\n")
    assert b"Message-ID: <order-2@orderflow.localhost>" in second


async def test_pipelined_transaction_over_tls(certificate: tuple[Path, Path]) -> None:
    async with _PipeliningServer(ssl=_server_context(certificate)) as server:
        sender = SmtpSender(server.url)
        await send(sender, 1)
        await send(sender, 2)
        await sender.close()
    assert len(server.messages) == 2
    assert sender.connections_opened == 1


async def test_pipelined_transaction_dot_stuffs_the_content() -> None:
    async with _PipeliningServer() as server:
        sender = SmtpSender(server.url)
        email = RENDERER.render(parse_order({"id": 3, "email": "a@example.com", "total": 1}))
        dotted = replace(email, data=b"Subject: x\r\n\r\n.hidden\nlast")
        await sender.send(dotted)
        await sender.close()
    assert server.messages == [b"Subject: x\r\n\r\n..hidden\r\nlast\r\n.\r\n"]


@pytest.mark.parametrize(
    ("replies", "error", "match"),
    [
        ({"MAIL": b"550 no such sender\r\n"}, PermanentSendError, "550 no such sender"),
        ({"MAIL": b"451 try later\r\n"}, TransientSendError, "451 try later"),
        ({"RCPT": b"550 no such user\r\n"}, PermanentSendError, "550 no such user"),
        ({"RCPT": b"450 mailbox busy\r\n"}, TransientSendError, "450 mailbox busy"),
        ({"DATA": b"554 no valid recipients\r\n"}, PermanentSendError, "554"),
        ({"END": b"552 too big\r\n"}, PermanentSendError, "552 too big"),
        ({"END": b"451 disk full\r\n"}, TransientSendError, "451 disk full"),
        ({"RCPT": b"CLOSE"}, TransientSendError, "connection failed"),
        ({"MAIL": b"SLEEP 5"}, TransientSendError, "timed out"),
        ({"MAIL": b"nonsense\r\n"}, TransientSendError, "Malformed"),
    ],
)
async def test_pipelined_transaction_errors_are_classified(
    replies: dict[str, bytes], error: type[Exception], match: str
) -> None:
    async with _PipeliningServer(replies) as server:
        sender = SmtpSender(server.url)
        with pytest.raises(error, match=match):
            await send(sender, 1)
        await sender.close()
    assert server.messages == []
    assert sender._idle == []  # a failed connection is never reused


async def test_a_pipelined_connection_dropped_while_idle_is_replaced() -> None:
    async with _PipeliningServer() as server:
        sender = SmtpSender(server.url, pool_size=1)
        await send(sender, 1)
        ((client, _),) = sender._idle
        assert client.transport is not None
        client.transport.close()  # as a server timing out an idle client would
        await send(sender, 2)
        await sender.close()
    assert sender.connections_opened == 2
    assert len(server.messages) == 2


class _DroppingServer:
    """Takes transactions until ``dropping`` is set; from then on closes each connection,
    old or new, at its next MAIL (as a server restarting under its clients would)."""

    def __init__(self) -> None:
        self.dropping = False
        self.connections = 0
        self.messages = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"smtp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}?timeout=2"

    async def __aenter__(self) -> _DroppingServer:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 dropping ESMTP\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-dropping\r\n250 PIPELINING\r\n")
        # One reply per command as it comes: right for a pipelining client and for one
        # that waits for each reply.
        while (line := await reader.readline()) and not line.upper().startswith(b"QUIT"):
            if self.dropping:
                writer.close()
                return
            writer.write(b"250 OK\r\n")  # MAIL
            await reader.readline()
            writer.write(b"250 OK\r\n")  # RCPT
            await reader.readline()
            writer.write(b"354 go ahead\r\n")  # DATA
            while await reader.readline() not in (b".\r\n", b""):
                pass
            self.messages += 1
            writer.write(b"250 accepted\r\n")
        writer.close()


async def test_a_dropped_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async with _DroppingServer() as server:
        sender = SmtpSender(server.url, pool_size=1, adaptive=False)
        await send(sender, 1)
        # The pooled connection looks alive, and is dropped at MAIL: the send goes on a
        # fresh connection, which is dropped too: that failure is the send's (no third).
        server.dropping = True
        async with asyncio.timeout(10):
            with pytest.raises(TransientSendError, match="connection"):
                await send(sender, 2)
        assert (sender.connections_opened, server.connections) == (2, 2)
        # The server is back: the next send opens a connection and goes through.
        server.dropping = False
        await send(sender, 3)
        await sender.close()
    assert (sender.connections_opened, server.messages) == (3, 2)
