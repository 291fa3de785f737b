"""``rediss://``: a TLS redis-server with a CA the tests generate; wrong CA or host refused."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orderflow.bus import Delivery, Message, StreamPublisher, StreamWorker, WorkerConfig, connect
from orderflow.cli import main
from orderflow.embedded.redis_server import RedisServer, free_port

from .conftest import start_tls_redis


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> Path:
    """A self-signed CA; returns its certificate (the key is next to it)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN=orderflow test {name}",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt"


def make_server_cert(directory: Path, ca: Path, san: str) -> tuple[Path, Path]:
    """A server certificate signed by ``ca`` for ``san`` (e.g. ``DNS:localhost``)."""
    (directory / "san.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "redis.key", "-out", "redis.csr",
        "-subj", "/CN=redis", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "redis.csr", "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
        "-CAcreateserial", "-out", "redis.crt", "-days", "2", "-extfile", "san.ext",
        cwd=directory,
    )  # fmt: skip
    return directory / "redis.crt", directory / "redis.key"


@dataclass
class TlsRedis:
    """A redis-server answering TLS on ``tls_port`` with a certificate for ``localhost``."""

    server: RedisServer
    tls_port: int
    ca: Path
    other_ca: Path

    def url(self, host: str = "localhost", ca: Path | None = None) -> str:
        """A ``rediss://`` URL trusting ``ca`` (default: the right one)."""
        return f"rediss://{host}:{self.tls_port}/0?ssl_ca_certs={ca or self.ca}"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """The TLS server: on Debian's redis-server when the suite's own has no TLS."""
    tmp = tmp_path_factory.mktemp("tls")
    ca = make_ca(tmp / "ca", "ca")
    other_ca = make_ca(tmp / "other", "other")
    cert, key = make_server_cert(tmp / "ca", ca, "DNS:localhost")
    tls_port = free_port()
    tls_args = [
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    server = start_tls_redis(tmp / "redis", tls_args)
    yield TlsRedis(server, tls_port, ca, other_ca)
    server.stop()


async def _ignore(delivery: Delivery) -> None:
    """Accept every entry."""


async def test_publish_and_consume_over_tls(tls_redis: TlsRedis) -> None:
    client = connect(tls_redis.url())
    try:
        await client.delete("orders")
        publisher = StreamPublisher(client)
        await publisher.publish_many("orders", [Message({"id": n}) for n in range(10)])
        worker = StreamWorker(client, WorkerConfig(stream="orders", group="g"), _ignore)
        stats = await worker.run(burst=True)
        assert stats.handled == 10
        assert stats.acked == 10
    finally:
        await client.aclose()


def test_operator_command_over_tls(
    tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", tls_redis.url())
    assert main(["streams", "info", "--json"]) == 0
    assert '"streams"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong CA", "not signed by a trusted CA"),
        ("system CAs only", "not signed by a trusted CA"),
        ("wrong host name", "not valid for '127.0.0.1'; connect with a host name the"),
    ],
)
def test_untrusted_server_is_refused_with_a_clear_error(
    tls_redis: TlsRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    reason: str,
) -> None:
    url = {
        "wrong CA": tls_redis.url(ca=tls_redis.other_ca),
        "system CAs only": f"rediss://localhost:{tls_redis.tls_port}/0",
        "wrong host name": tls_redis.url(host="127.0.0.1"),
    }[case]
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", url)
    assert main(["streams", "info"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at rediss://" in err
    assert "TLS" in err
    assert reason in err
    assert "Traceback" not in err


def test_email_worker_does_not_wait_for_a_server_it_cannot_trust(
    tls_redis: TlsRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # A worker waits for a Redis that is down, but a certificate that fails verification
    # is a configuration error: it exits 1 at once, saying why.
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", tls_redis.url(ca=tls_redis.other_ca))
    monkeypatch.setenv("ORDERFLOW_SMTP_URL", "smtp://127.0.0.1:2525")
    monkeypatch.setenv("ORDERFLOW_DATA_DIR", str(tmp_path))
    assert main(["email", "worker"]) == 1
    err = capsys.readouterr().err
    assert "not signed by a trusted CA" in err
    assert "waiting for it" not in err
