"""The composition root: the Order Service's API, the web console and the event
catalogue (``/asyncapi.json``) in one app.

``orders`` knows nothing of the console, and the console works only through the
Order Service's runtime (``orders.runtime``); this module puts them together.
``app_from_environment`` and ``app_without_relay`` are uvicorn's factories
(``orderflow orders serve --workers N`` names them by import string).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from fastapi import FastAPI

from orderflow import tracing
from orderflow.config import Settings
from orderflow.console import console_router
from orderflow.contracts.router import asyncapi_router
from orderflow.orders import api as orders_api
from orderflow.orders.database import Database
from orderflow.orders.relay import RelayConfig


def create_app(
    settings: Settings,
    *,
    redis: aioredis.Redis | None = None,
    database: Database | None = None,
    run_relay: bool = True,
    run_email_status: bool = True,
    run_reconciler: bool = True,
    relay_config: RelayConfig | None = None,
) -> FastAPI:
    """The Order Service's API (see ``orders.api.create_app``) with the console at ``/``."""
    app = orders_api.create_app(
        settings,
        redis=redis,
        database=database,
        run_relay=run_relay,
        run_email_status=run_email_status,
        run_reconciler=run_reconciler,
        relay_config=relay_config,
    )
    # The console's lifespan runs inside the API's, so the runtime is there first.
    app.include_router(console_router(settings))
    app.include_router(asyncapi_router(settings))
    return app


def app_from_environment() -> FastAPI:
    """The app with settings from ``ORDERFLOW_*`` (uvicorn's factory, one per worker)."""
    tracing.setup("orderflow-orders")  # each worker process is a process start
    return create_app(Settings())


def app_without_relay() -> FastAPI:
    """As ``app_from_environment``, without the outbox relay."""
    tracing.setup("orderflow-orders")
    return create_app(Settings(), run_relay=False)
