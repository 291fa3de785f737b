"""The AsyncAPI document: valid for the official parser, printed by the CLI, served by
the API, generated from the models (no hand-kept schema)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import SecretStr

from orderflow.app import create_app
from orderflow.config import Settings
from orderflow.contracts import MESSAGES, asyncapi_document
from orderflow.email.order import OrderCreatedV2

from .conftest import errors, parse_asyncapi

ORDERFLOW = Path(sys.executable).parent / "orderflow"


def _cli(*args: str) -> str:
    done = subprocess.run(
        [str(ORDERFLOW), "asyncapi", *args], capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_cli_document_passes_the_official_parser(
    fmt: str, asyncapi_parser: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"asyncapi.{fmt}"
    path.write_text(_cli("--format", fmt))

    verdict = parse_asyncapi(asyncapi_parser, path)

    assert errors(verdict) == []
    assert verdict["parsed"]


def test_parser_catches_a_broken_schema(asyncapi_parser: Path, tmp_path: Path) -> None:
    # The check above is worth something only if the parser looks at the schemas.
    document = copy.deepcopy(asyncapi_document())
    document["components"]["schemas"]["EmailSent"]["properties"]["order_id"]["type"] = "integr"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(document))

    found = errors(parse_asyncapi(asyncapi_parser, path))

    assert any("order_id" in error["path"] for error in found), found


def test_document_has_every_channel_message_and_operation() -> None:
    document = asyncapi_document()

    assert document["asyncapi"] == "3.0.0"
    addresses = {key: channel["address"] for key, channel in document["channels"].items()}
    assert addresses == {
        "orders": "orders",
        "ordersPartition": "{partition}",
        "ordersDeadLetters": "orders:dlq",
        "emailEvents": "email-events",
        "ordersPubSub": "orders",
    }
    partition = document["channels"]["ordersPartition"]["parameters"]["partition"]
    assert partition["examples"] == ["{orders:0}", "{orders:1}"]
    messages = document["components"]["messages"]
    assert set(messages) == {spec.key for spec in MESSAGES}
    v2 = messages["orderCreatedV2"]
    assert v2["headers"]["properties"]["ce_dataschema"]["enum"] == [
        "urn:orderflow:schema:order.created:2"
    ]
    assert v2["examples"][0]["payload"]["customer"]["name"] == "Alice"
    senders = {
        (op["action"], op["channel"]["$ref"], op["tags"][0]["name"])
        for op in document["operations"].values()
    }
    assert ("send", "#/channels/orders", "order-service") in senders
    assert ("receive", "#/channels/orders", "email-service") in senders
    assert ("send", "#/channels/emailEvents", "email-service") in senders
    assert ("receive", "#/channels/emailEvents", "order-service") in senders
    assert ("send", "#/channels/ordersDeadLetters", "email-service") in senders


def test_payload_schemas_are_the_models_own() -> None:
    schemas = asyncapi_document()["components"]["schemas"]
    generated = OrderCreatedV2.model_json_schema(ref_template="#/components/schemas/{model}")
    generated.pop("$defs")
    assert schemas["OrderCreatedV2"] == generated


def test_names_follow_the_settings() -> None:
    settings = Settings(stream="shop", email_events_stream="shop-mail", channel="lab")
    channels = asyncapi_document(settings)["channels"]
    assert channels["orders"]["address"] == "shop"
    assert channels["ordersDeadLetters"]["address"] == "shop:dlq"
    assert channels["emailEvents"]["address"] == "shop-mail"
    assert channels["ordersPubSub"]["address"] == "lab"


async def test_api_serves_the_document_as_json_and_yaml(redis_url: str, tmp_path: Path) -> None:
    settings = Settings(
        redis_url=SecretStr(redis_url),
        database_url=SecretStr(f"sqlite:///{tmp_path}/orders.db"),
        data_dir=tmp_path,
    )
    app = create_app(settings, run_relay=False, run_email_status=False, run_reconciler=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders.test") as client:
            as_json = await client.get("/asyncapi.json")
            as_yaml = await client.get("/asyncapi.yaml")

    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.json() == asyncapi_document(settings)
    assert as_yaml.status_code == 200
    assert as_yaml.headers["content-type"] == "application/yaml"
    assert yaml.safe_load(as_yaml.text) == as_json.json()
