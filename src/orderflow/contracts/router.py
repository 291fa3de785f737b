"""``GET /asyncapi.json`` and ``/asyncapi.yaml``: the event catalogue over HTTP."""

from __future__ import annotations

import functools

import orjson
from fastapi import APIRouter, Response

from orderflow.config import Settings
from orderflow.contracts.asyncapi import asyncapi_document, to_yaml


def asyncapi_router(settings: Settings) -> APIRouter:
    """Routes serving the AsyncAPI document of ``settings``' names (built once)."""
    router = APIRouter(tags=["events"])

    @functools.cache
    def rendered() -> tuple[bytes, bytes]:
        document = asyncapi_document(settings)
        return orjson.dumps(document), to_yaml(document).encode()

    @router.get("/asyncapi.json", summary="The AsyncAPI 3.0 document of orderflow's events")
    async def asyncapi_json() -> Response:
        return Response(rendered()[0], media_type="application/json")

    @router.get("/asyncapi.yaml", summary="The same document as YAML")
    async def asyncapi_yaml() -> Response:
        return Response(rendered()[1], media_type="application/yaml")

    return router
