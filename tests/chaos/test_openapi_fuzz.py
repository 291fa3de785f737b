"""Schemathesis against the running Order Service's ``/openapi.json``: no 5xx, ever.

Bounded: a few dozen generated requests per operation, against a real
``orderflow orders serve`` process on a private Redis and SQLite.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from orderflow.embedded.redis_server import RedisServer, free_port

from .conftest import ORDERFLOW

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def api_url(shared_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running ``orderflow orders serve``."""
    tmp = tmp_path_factory.mktemp("openapi")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERFLOW_")}
    env.update(
        ORDERFLOW_REDIS_URL=shared_redis.url,
        ORDERFLOW_DATABASE_URL=f"sqlite:///{tmp / 'orders.db'}",
        ORDERFLOW_DATA_DIR=str(tmp),
    )
    log = (tmp / "api.log").open("wb")
    process = subprocess.Popen(
        [ORDERFLOW, "orders", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError((tmp / "api.log").read_text())
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(20)
    log.close()
    assert "Traceback" not in (tmp / "api.log").read_text()


def test_no_request_makes_the_service_fail(api_url: str) -> None:
    # The operations' strategies driven by Hypothesis directly: schemathesis's pytest
    # plugin (from_fixture) does not work with this pytest version.
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    examples = int(os.environ.get("ORDERFLOW_SCHEMATHESIS_EXAMPLES", "30"))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /orders", "GET /orders/{order_id}"}
    for operation in operations:

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(base_url=api_url)
            assert response.status_code < 500, f"{case.method} {case.path}: {response.text}"
            if 400 <= response.status_code < 500:
                # Every refusal is a problem document saying what is wrong.
                content_type = response.headers["content-type"][0]
                assert content_type.startswith(PROBLEM_JSON), response.text
                assert response.json()["detail"]

        check()
