"""Who may use the console: loopback only without a token; the admin token otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from orderflow.console.security import is_loopback_host

from .conftest import make_settings, running_console

TOKEN = "s3cret-token-long-enough-for-this"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com"])
async def test_beyond_loopback_without_a_token_is_refused_clearly(
    redis_url: str, tmp_path: Path, host: str
) -> None:
    settings = make_settings(redis_url, tmp_path, api_host=host)
    async with running_console(settings) as console:
        page = await console.client.get("/")
        events = await console.client.get("/console/events")
        health = await console.client.get("/health")

    assert page.status_code == 403
    assert "ORDERFLOW_ADMIN_TOKEN" in page.text
    assert "beyond loopback" in page.text
    assert events.status_code == 403
    assert health.status_code == 200  # the API itself is not the console's to refuse


async def test_remote_clients_and_foreign_host_names_are_refused(
    redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, tmp_path)
    async with running_console(settings, client=("10.1.2.3", 40000)) as remote:
        assert (await remote.client.get("/")).status_code == 403
    async with running_console(settings) as local:
        # DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own Host.
        rebound = await local.client.get("/", headers={"host": "evil.example:8000"})
        assert rebound.status_code == 403
        assert "evil.example" in rebound.text
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert (await local.client.get("/", headers={"host": host})).status_code == 200


async def test_admin_token_is_required_when_set(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, api_host="0.0.0.0", admin_token=SecretStr(TOKEN))
    async with running_console(settings, client=("10.1.2.3", 40000)) as console:
        anonymous = await console.client.get("/flow", headers={"accept": "text/html"})
        assert anonymous.status_code == 401
        assert 'action="/console/login"' in anonymous.text
        assert (await console.client.get("/console/events")).status_code == 401

        bearer = await console.client.get("/flow", headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200
        wrong_bearer = await console.client.get("/flow", headers={"authorization": "Bearer x"})
        assert wrong_bearer.status_code == 401

        form = await console.client.get("/console/login")
        csrf = console.client.cookies["orderflow_csrf"]
        assert form.status_code == 200
        wrong = await console.client.post(
            "/console/login", data={"csrf_token": csrf, "token": "guess"}
        )
        assert wrong.status_code == 401
        # The form again, with the refusal's detail shown as an alert (the title
        # "Wrong token" only selects it; it is not on the page).
        assert 'role="alert">That is not the admin token.</p>' in wrong.text
        assert 'role="alert"' not in form.text
        no_csrf = await console.client.post("/console/login", data={"token": TOKEN})
        assert no_csrf.status_code == 403
        right = await console.client.post(
            "/console/login", data={"csrf_token": csrf, "token": TOKEN}
        )
        assert right.status_code == 303
        session = console.client.cookies["orderflow_console"]
        assert TOKEN not in session  # the cookie holds an HMAC, never the token
        assert (await console.client.get("/flow")).status_code == 200


async def test_a_short_admin_token_turns_the_console_off(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, admin_token=SecretStr("short"))
    async with running_console(settings) as console:
        response = await console.client.get("/", headers={"authorization": "Bearer short"})
    assert response.status_code == 503
    assert "at least 16 characters" in response.text


def test_loopback_names() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "app.localhost"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com", ""):
        assert not is_loopback_host(host), host
