"""Fixtures of the console tests: the Order Service app with its console, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from orderflow.app import create_app
from orderflow.config import Settings
from orderflow.console.live import LiveFeed
from orderflow.orders.runtime import OrderRuntime

#: The console answers only to loopback names unless an admin token is set.
BASE_URL = "http://127.0.0.1:8000"


def make_settings(redis_url: str, data_dir: Path, **options: Any) -> Settings:
    """Settings on the shared test Redis and a SQLite database in ``data_dir``."""
    return Settings(
        redis_url=SecretStr(redis_url),
        database_url=SecretStr(f"sqlite:///{data_dir}/orders.db"),
        data_dir=data_dir,
        **options,
    )


@dataclass
class Console:
    """A running app and a browser-like client on it."""

    app: FastAPI
    client: httpx.AsyncClient

    @property
    def runtime(self) -> OrderRuntime:
        """The Order Service's running pieces."""
        runtime: OrderRuntime = self.app.state.orders
        return runtime

    @property
    def feed(self) -> LiveFeed:
        """The console's live feed."""
        feed: LiveFeed = self.app.state.console
        return feed

    async def csrf(self) -> str:
        """Load a page so the CSRF cookie is set; return the token forms carry."""
        response = await self.client.get("/", headers={"accept": "text/html"})
        assert response.status_code == 200, response.text
        token = self.client.cookies.get("orderflow_csrf")
        assert token
        return token

    async def post_form(self, path: str, data: dict[str, Any], **kwargs: Any) -> httpx.Response:
        """POST an HTML form (urlencoded; a list value repeats the field)."""
        return await self.client.post(path, data=data, **kwargs)


@asynccontextmanager
async def running_console(
    settings: Settings, *, client: tuple[str, int] = ("127.0.0.1", 50000), **options: Any
) -> AsyncIterator[Console]:
    """The app with its lifespan (background loops off unless asked for) and a client."""
    options.setdefault("run_relay", False)
    options.setdefault("run_email_status", False)
    options.setdefault("run_reconciler", False)
    app = create_app(settings, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            yield Console(app, http)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Settings for a console on loopback with no admin token."""
    return make_settings(redis_url, tmp_path)


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[Console]:
    """The console on loopback, no admin token."""
    async with running_console(settings) as running:
        yield running
