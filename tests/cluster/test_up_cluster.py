"""`orderflow up` pointed at a Redis Cluster: every component on the cluster's partitions."""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import pytest

from orderflow.bus.partitions import DEFAULT_CLUSTER_PARTITIONS
from orderflow.embedded.redis_server import free_port
from tests.support import poll_until
from tests.test_up import Up, alive, children_of, http

pytestmark = pytest.mark.slow


def test_up_on_a_cluster_emails_each_order_once_and_stops_cleanly(
    cluster_url: str, tmp_path: Path
) -> None:
    port = free_port()
    up = Up(
        tmp_path,
        port,
        "--workers",
        "2",
        "--status-interval",
        "0.5",
        ORDERFLOW_REDIS_URL=cluster_url,
    )
    try:
        up.wait_for("orderflow is up")
        # No embedded Redis: the cluster given is used, and named without a password.
        assert not any("embedded, AOF" in line for line in up.output)
        api = f"http://127.0.0.1:{port}"
        ids = []
        for n in range(12):
            status, order = http(
                "POST", f"{api}/orders", {"email": f"c{n}@example.com", "total": "3"}
            )
            assert status == 201
            ids.append(order["id"])
        mail = tmp_path / ".orderflow" / "mail" / "new"
        poll_until(lambda: mail.is_dir() and len(list(mail.iterdir())) == 12, 60, what="12 emails")
        poll_until(
            lambda: all(http("GET", f"{api}/orders/{i}")[1]["email_status"] == "sent" for i in ids),
            60,
            what="every status sent",
        )
        texts = [path.read_text() for path in mail.iterdir()]
        assert sorted(t.split("Message-ID: <order-")[1].split("@")[0] for t in texts) == sorted(
            str(i) for i in ids
        )
        # The orders went over the cluster's partitions; /metrics reads each of them.
        metrics = urllib.request.urlopen(f"{api}/metrics", timeout=10).read().decode()
        partitions = [
            f'orderflow_group_pending{{group="email-service",stream="{{orders:{i}}}"}} 0.0'
            for i in range(DEFAULT_CLUSTER_PARTITIONS)
        ]
        assert all(line in metrics for line in partitions), metrics
        up.wait_for("emails in the Maildir 12")  # the live status line

        children = children_of(up.proc.pid)
        # What it must have started on a cluster: no redis-server of its own, the mail
        # sink, the two workers and the API. Were none found, the check below would
        # hold whatever became of them.
        roles = sorted(_role(pid) for pid in children)
        assert roles == ["email worker", "email worker", "mail sink", "orders serve"], roles
        up.proc.send_signal(signal.SIGINT)
        assert up.finish() == 0
        assert "stopped cleanly" in up.output[-1]
        assert not [pid for pid in children if alive(pid)]
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.finish()


def _role(pid: int) -> str:
    """The ``orderflow`` subcommand a child runs (its first two arguments after
    ``orderflow``), or its program name when it is not an ``orderflow`` process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return f"gone {pid}"
    for i, arg in enumerate(argv):
        if arg == "orderflow" or arg.endswith("/orderflow"):
            return " ".join(argv[i + 1 : i + 3])
    return Path(argv[0]).name
