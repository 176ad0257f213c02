"""The three-node RabbitMQ cluster of `./dev cluster` (scripts/dev-cluster), for tests
and the soak: start it, give a test a vhost on it, stop and start its nodes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sandfleet.common.settings import Settings
from sandfleet.gateway.broker_setup import apply_fleet_policies
from tests.support.runtimes import ROOT

NODES = ("sandfleet-1@localhost", "sandfleet-2@localhost", "sandfleet-3@localhost")
PORTS = {node: 5681 + number for number, node in enumerate(NODES)}
START_TIMEOUT_SECONDS = 600
ADMIN_URL = "http://guest:guest@127.0.0.1:15681/"  # node 1's management API


def ensure_cluster() -> None:
    """Start the cluster's nodes that are not running (idempotent)."""
    done = subprocess.run(
        [ROOT / "scripts" / "dev-cluster", "start"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"./dev cluster start failed:\n{done.stdout}\n{done.stderr}")


def ctl(node: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "-n", node, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout


def running(node: str) -> bool:
    return (
        subprocess.run(
            ["rabbitmqctl", "-q", "-n", node, "await_startup", "--timeout", "1"],
            capture_output=True,
            timeout=60,
            check=False,
        ).returncode
        == 0
    )


def stop_node(node: str) -> None:
    """Stop the RabbitMQ application on `node` (the Erlang VM stays, as in an upgrade)."""
    ctl(node, "stop_app")


def start_node(node: str) -> None:
    ctl(node, "start_app", timeout=300)
    ctl(node, "await_startup", "--timeout", "300", timeout=360)


def any_running_node() -> str:
    return next(node for node in NODES if running(node))


def queue_leader(vhost: str, queue: str) -> str:
    """The node that leads quorum queue `queue` (or stream) now."""
    listed = ctl(any_running_node(), "list_queues", "-p", vhost, "name", "leader",
                 "--formatter", "json")  # fmt: skip
    for row in json.loads(listed):
        if row["name"] == queue:
            leader: str = row["leader"]
            return leader
    raise LookupError(f"no queue {queue} in vhost {vhost}")


def url_list(vhost: str) -> str:
    """SANDFLEET_BROKER_URL for `vhost`: every node, node 1 first."""
    return ",".join(f"amqp://guest:guest@127.0.0.1:{PORTS[node]}/{vhost}" for node in NODES)


@contextmanager
def cluster_vhost() -> Iterator[str]:
    """A fresh vhost on the cluster, as a URL list; every node is running again after."""
    ensure_cluster()
    vhost = f"sandfleet-test-{uuid.uuid4().hex[:12]}"
    ctl(NODES[0], "add_vhost", vhost)
    ctl(NODES[0], "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    urls = url_list(vhost)
    # As `sandfleet broker setup` leaves a fleet: limits, and leaders spread over nodes.
    asyncio.run(apply_fleet_policies(Settings(broker_url=urls), admin_url=ADMIN_URL))
    try:
        yield urls
    finally:
        for node in NODES:
            if not running(node):
                start_node(node)
        ctl(NODES[0], "delete_vhost", vhost)
