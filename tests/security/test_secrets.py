"""Passwords and tokens never appear in logs, errors, ``streams info`` or metrics.

Real commands run with secrets in their URLs (and the console's admin token set); their
whole output, logs, HTTP answers and metrics are searched for every secret.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from orderflow.app import create_app
from orderflow.cli import main
from orderflow.config import Settings
from orderflow.embedded.redis_server import free_port
from orderflow.embedded.smtp_server import SmtpServer
from tests.support import CountingHandler, clean_env, wait_until

from .conftest import AclRedis, password_of

ORDERFLOW = str(Path(sys.executable).parent / "orderflow")
SMTP_PASSWORD = "smtp-Secret-4471"
ADMIN_TOKEN = "console-Token-8812"
WRONG_PASSWORD = "wrong-Secret-5530"


def _assert_clean(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret!r} leaked:\n{text[-3000:]}"


def _env(tmp: Path, redis_url: str, smtp_url: str) -> dict[str, str]:
    return clean_env(
        ORDERFLOW_REDIS_URL=redis_url,
        ORDERFLOW_SMTP_URL=smtp_url,
        ORDERFLOW_DATABASE_URL=f"sqlite:///{tmp / 'orders.db'}",
        ORDERFLOW_DATA_DIR=str(tmp),
        ORDERFLOW_ADMIN_TOKEN=ADMIN_TOKEN,
        ORDERFLOW_CLAIM_IDLE_MS="500",
        ORDERFLOW_MAX_DELIVERIES="2",
    )


@pytest.mark.slow
async def test_processes_never_print_their_secrets(acl: AclRedis, tmp_path: Path) -> None:
    smtp = SmtpServer(CountingHandler(), port=0)
    await smtp.start()
    # The sink offers no AUTH: the worker's login fails, and that error is logged.
    smtp_url = f"smtp://mailer:{SMTP_PASSWORD}@127.0.0.1:{smtp.port}?timeout=2"
    api_port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("api", "worker")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, user, args in (
            ("api", "order-service", ["orders", "serve", "--port", str(api_port)]),
            ("worker", "email-service", ["email", "worker", "--concurrency", "2"]),
        ):
            with logs[name].open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [ORDERFLOW, "--log-level", "DEBUG", *args],
                        env=_env(tmp_path, acl.url(user), smtp_url),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        base = f"http://127.0.0.1:{api_port}"
        answers = []
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:

            async def healthy() -> bool:
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_until(healthy, timeout=60, interval=0.1)
            order = {"id": 7, "email": "a@example.com", "total": "1.00"}
            answers.append((await http.post("/orders", json=order)).text)

            # The login failure holds sends (the SMTP gate) and is logged, with its
            # reason, once and then every 30 s.
            await wait_until(
                lambda: "holding sends" in logs["worker"].read_text(), timeout=30, interval=0.2
            )
            for path in ("/orders/7", "/health", "/metrics", "/openapi.json"):
                answers.append((await http.get(path)).text)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        await smtp.stop()
    secrets = (password_of("order-service"), password_of("email-service"), SMTP_PASSWORD)
    text = "\n".join([*(path.read_text() for path in logs.values()), *answers])
    assert "mailer:***@" in text  # the worker did name its SMTP server, redacted
    _assert_clean(text, *secrets, ADMIN_TOKEN)


@pytest.mark.parametrize("reachable", [True, False], ids=["reachable", "unreachable"])
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_streams_info_never_shows_the_password(
    acl: AclRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    reachable: bool,
    as_json: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    user = "orderflow-operator"
    url = (
        acl.url(user) if reachable else f"redis://{user}:{WRONG_PASSWORD}@127.0.0.1:{free_port()}/0"
    )
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", url)
    code = main(["streams", "info", *(["--json"] if as_json else [])])
    assert code == (0 if reachable else 1)
    captured = capsys.readouterr()
    assert "***@127.0.0.1" in captured.out + captured.err
    _assert_clean(captured.out + captured.err + caplog.text, password_of(user), WRONG_PASSWORD)


def test_a_wrong_password_is_reported_without_it(
    acl: AclRedis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://email-service:{WRONG_PASSWORD}@127.0.0.1:{acl.server.port}/0"
    monkeypatch.setenv("ORDERFLOW_REDIS_URL", url)
    assert main(["dlq", "list"]) == 1
    err = capsys.readouterr().err
    assert "email-service:***@" in err
    assert "password" in err.lower()  # it says what is wrong: the password
    _assert_clean(err, WRONG_PASSWORD)


async def test_the_order_service_logs_no_password_while_redis_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://order-service:{WRONG_PASSWORD}@127.0.0.1:{free_port()}/0"
    settings = Settings(
        redis_url=SecretStr(url),
        database_url=SecretStr(f"sqlite:///{tmp_path / 'orders.db'}"),
        data_dir=tmp_path,
        admin_token=SecretStr(ADMIN_TOKEN),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            body = {"email": "a@example.com", "total": "1.00"}
            created = await http.post("/orders", json=body)
            assert created.status_code == 201
            health = await http.get("/health")
            assert health.status_code == 503
            await wait_until(lambda: "relay cannot publish" in caplog.text, timeout=10)
            texts = [created.text, health.text, (await http.get("/metrics")).text]
    texts.append(caplog.text)
    texts.append(repr(settings))
    _assert_clean("\n".join(texts), WRONG_PASSWORD, ADMIN_TOKEN)
