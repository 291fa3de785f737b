"""``streams info`` names the server it talks to and the optional features it found."""

from __future__ import annotations

import json

import redis

from tests.conftest import expected_server

from .conftest import Cli


def test_json_names_the_server_and_its_features(cli: Cli, sync_redis: redis.Redis) -> None:
    sync_redis.xadd("orders", {"data": "{}"})

    result = cli("streams", "info", "--json")

    assert result.code == 0, result.err
    assert json.loads(result.out)["server"] == expected_server()


def test_the_table_starts_with_the_server_line(cli: Cli, sync_redis: redis.Redis) -> None:
    sync_redis.xadd("orders", {"data": "{}"})
    server = expected_server()
    features: dict[str, bool] = server["features"]  # type: ignore[assignment]
    said = {True: "yes", False: "no"}

    result = cli("streams", "info")

    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == (
        f"Server: {server['name']} {server['version']} (standalone); "
        f"XTRIM … ACKED: {said[features['xtrim_acked']]}, "
        f"lag in XINFO: {said[features['xinfo_lag']]}"
    )


def test_without_a_stream_the_xinfo_feature_is_unknown(cli: Cli) -> None:
    result = cli("streams", "info", "--json")

    assert result.code == 0, result.err
    assert json.loads(result.out)["server"]["features"]["xinfo_lag"] is None
