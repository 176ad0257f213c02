"""TLS to a real RabbitMQ: nodes of their own (tests/support/tls_broker.py) that speak
only TLS, with certificates from a CA this test makes. A gateway, a worker process and
a client all connect over amqps://; a broker the CA did not sign is refused; a broker
that requires client certificates takes only a client that shows one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandfleet.common.amqp import connect
from sandfleet.common.errors import FleetUnreachable
from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from tests.support import submit_and_wait
from tests.support.cli import run_sandfleet, sandfleet_env
from tests.support.processes import start_worker
from tests.support.tls_broker import TLSNode, running_tls_nodes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def tls_nodes() -> Iterator[tuple[TLSNode, TLSNode]]:
    """Two TLS nodes, started together: one that checks a client certificate only when
    shown one, and one that requires it."""
    with running_tls_nodes(require_client_cert=[False, True]) as (checking, requiring):
        yield checking, requiring


@pytest.fixture
def tls_broker(tls_nodes: tuple[TLSNode, TLSNode]) -> TLSNode:
    return tls_nodes[0]


@pytest.fixture
def mtls_broker(tls_nodes: tuple[TLSNode, TLSNode]) -> TLSNode:
    return tls_nodes[1]


def tls_settings(
    node: TLSNode, tmp_path: Path, keys: tuple[Path, Path] | None = None, **overrides: Path
) -> Settings:
    return Settings(
        broker_url=node.url(),
        signing_key=keys[0] if keys else None,
        trusted_keys=str(keys[1]) if keys else "",
        broker_ca=overrides.get("broker_ca", node.pki.ca),
        broker_cert=overrides.get("broker_cert"),
        broker_key=overrides.get("broker_key"),
        host=f"h{uuid.uuid4().hex[:8]}",
        state_dir=tmp_path / "state",
        journal_dir=tmp_path / "journal",
        heartbeat_seconds=1.0,
        stop_grace_seconds=1.0,
    )


def job(job_id: str) -> dict[str, object]:
    template = {"image": "none", "command": ["echo", "hi"], "driver_config": {"inmemory": {}}}
    return {"job_id": job_id, "driver": "inmemory", "template": template}


async def test_a_job_runs_with_gateway_worker_and_client_over_tls(
    tls_broker: TLSNode, tmp_path: Path, signing_keys: tuple[Path, Path]
) -> None:
    # The node has no plain listener: every connection below is TLS, verified by the CA.
    settings = tls_settings(tls_broker, tmp_path, signing_keys)
    tls_env = {"SANDFLEET_BROKER_CA": str(tls_broker.pki.ca)}
    async with Gateway(settings), Client(settings=settings) as client:
        worker, _ = await start_worker(settings, client, driver="inmemory", env=tls_env)
        try:
            job_id = f"tls-{uuid.uuid4().hex[:8]}"
            events = await submit_and_wait(client, job(job_id))
            assert [e.phase for e in events][-1] is Phase.SUCCEEDED, events
            # The CLI reads the same settings from the environment.
            ran = await run_sandfleet(sandfleet_env(settings, **tls_env), "status", job_id)
            assert (ran.returncode, ran.stderr) == (0, ""), ran
            assert "succeeded" in ran.stdout
        finally:
            worker.kill()
            await worker.wait()


async def test_a_broker_the_ca_did_not_sign_is_refused(tls_broker: TLSNode, tmp_path: Path) -> None:
    stranger = tls_broker.pki.stranger_ca
    settings = tls_settings(tls_broker, tmp_path, broker_ca=stranger)
    with pytest.raises(FleetUnreachable) as raised:
        async with Client(settings=settings, connect_timeout=5):
            pass
    assert raised.value.url == tls_broker.url().replace(":guest@", ":***@")
    assert raised.value.reason.startswith("TLS: certificate verify failed: "), raised.value

    env = sandfleet_env(settings, SANDFLEET_BROKER_CA=str(stranger))
    ran = await run_sandfleet(env, "status", "any-job")
    assert ran.returncode == 3  # FLEET_UNREACHABLE
    assert ran.stderr.startswith(
        f"sandfleet: cannot reach the fleet at {raised.value.url}: TLS: certificate verify failed"
    ), ran.stderr


async def test_a_broker_that_requires_a_client_certificate_takes_only_a_client_with_one(
    mtls_broker: TLSNode, tmp_path: Path
) -> None:
    pki = mtls_broker.pki
    without = tls_settings(mtls_broker, tmp_path)
    with pytest.raises(FleetUnreachable) as raised:
        await connect(mtls_broker.url(), name="test", settings=without, timeout=5)
    # The broker's alert, or (TLS 1.3 sends it after the handshake) the hang-up it ends with.
    assert raised.value.reason.startswith("TLS: "), raised.value
    assert "(SANDFLEET_BROKER_CERT, SANDFLEET_BROKER_KEY)" in raised.value.reason

    shown = tls_settings(
        mtls_broker, tmp_path, broker_cert=pki.client.cert, broker_key=pki.client.key
    )
    async with await connect(
        mtls_broker.url(), name="test", settings=shown, timeout=5
    ) as connection:
        channel = await connection.channel()
        await channel.close()
