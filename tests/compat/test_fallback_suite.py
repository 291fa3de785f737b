"""The tests that exercise each fast path, run again with every fast path forced off.

A release of redis-py or aiosmtplib outside the tested ranges turns
the fast paths off: orderflow must then be slower, never wrong. This runs the worker,
transport, sender, cluster-client and metrics tests in a child pytest with
``ORDERFLOW_COMPAT=fallback``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = [
    "tests/compat/test_versions.py",
    "tests/bus/test_worker.py",
    "tests/bus/test_transports.py",
    "tests/bus/test_retention.py",
    "tests/email/test_sender.py",
    "tests/test_metrics.py",
    "tests/cluster/test_cluster_client.py",
    "tests/cluster/test_cluster_flow.py",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_suite_passes_with_every_fallback_forced() -> None:
    env = {**os.environ, "ORDERFLOW_COMPAT": "fallback"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *SUITE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, tail
    # The fast-path-only tests are skipped, and said to be: nothing else is.
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped, tail
    assert all("forced off by ORDERFLOW_COMPAT" in line for line in skipped), tail
