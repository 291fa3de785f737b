"""The cluster harness's own logic: ports clear of outgoing connections, and a retry."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from tests.cluster import harness
from tests.cluster.harness import LocalCluster, cluster_port, start_node


def test_ports_and_bus_ports_lie_below_the_ephemeral_range() -> None:
    low = harness._ephemeral_low()
    for _ in range(50):
        port = cluster_port()
        if low - 10_001 >= 12_000:
            assert port >= 11_000
            assert port + 10_000 < low
        else:
            assert 20_000 <= port <= 45_000


def test_a_node_whose_bus_port_was_taken_starts_on_a_new_pair(tmp_path: Path) -> None:
    """A port checked free can be taken before the node binds it (another process's
    connection): the node then starts on a new pair instead of failing the session."""
    node = LocalCluster(tmp_path, masters=1, replicas=0).nodes[0]
    taken = node.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken + 10_000))
        squatter.listen()
        start_node(node)
    try:
        assert node.port != taken
        assert redis.Redis(port=node.port).ping()
    finally:
        node.stop()


def test_a_start_failing_for_another_reason_is_not_retried(tmp_path: Path) -> None:
    node = LocalCluster(tmp_path, masters=1, replicas=0).nodes[0]
    node.extra_args.append("--no-such-option")
    port = node.port
    with pytest.raises(RuntimeError, match="exited at start"):
        start_node(node)
    assert node.port == port
