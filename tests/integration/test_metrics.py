"""/metrics and /healthz of a real gateway and an in-memory worker on a real broker
(issue 11): the counts match the jobs run, and health follows the broker connection."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandfleet.common.events import Phase
from sandfleet.common.metrics import metrics_served
from sandfleet.common.settings import Settings
from sandfleet.common.topology import SUBMIT_QUEUE, job_queue_name
from sandfleet.gateway.broker_setup import DEFAULT_ADMIN_URL, CredentialsFile, set_up_broker
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from sandfleet.workers.runtime import Worker
from tests.support import eventually
from tests.support.broker import rabbitmqctl, vhost_of
from tests.support.cli import sandfleet_env, spawn_sandfleet
from tests.support.runtimes import registered_driver, worker_factory

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Fleet:
    settings: Settings
    gateway: Gateway
    worker: Worker
    gateway_url: str  # http://127.0.0.1:<port>
    worker_url: str
    http: aiohttp.ClientSession


@pytest.fixture
async def fleet(make_settings: Callable[..., Settings]) -> AsyncIterator[Fleet]:
    """A gateway and an in-memory worker, each serving its metrics on a port of its own."""
    settings = make_settings(metrics_port=0)  # 0: any free port
    async with AsyncExitStack() as stack:
        gateway = Gateway(settings)
        served = metrics_served(
            gateway.metrics.registry,
            settings,
            healthy=lambda: gateway.healthy,
            before_scrape=gateway.refresh_metrics,
        )
        gateway_server = await stack.enter_async_context(served)
        await stack.enter_async_context(gateway)
        start = worker_factory(settings, registered_driver("inmemory"))
        worker = await stack.enter_async_context(start(slots=2))
        worker_server = await stack.enter_async_context(
            metrics_served(worker.metrics.registry, settings, healthy=lambda: worker.healthy)
        )
        assert gateway_server is not None and worker_server is not None
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Fleet(
            settings=settings,
            gateway=gateway,
            worker=worker,
            gateway_url=f"http://127.0.0.1:{gateway_server.port}",
            worker_url=f"http://127.0.0.1:{worker_server.port}",
            http=http,
        )


async def scrape(fleet: Fleet, url: str) -> Samples:
    async with fleet.http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def health(fleet: Fleet, url: str) -> int:
    async with fleet.http.get(f"{url}/healthz") as response:
        return response.status


def request(exit_code: int = 0) -> dict[str, Any]:
    return {
        "job_id": f"m-{uuid.uuid4().hex[:8]}",
        "driver": "inmemory",
        "template": {
            "image": "none",
            "command": ["true"],
            "driver_config": {"inmemory": {"exit_code": exit_code}},
        },
    }


async def test_metrics_count_the_jobs_run_by_phase_and_stage(fleet: Fleet) -> None:
    async with Client(settings=fleet.settings) as client:
        ends = await asyncio.gather(*(client.run(request(code), timeout=60) for code in (0, 0, 3)))
    assert sorted(end.phase for end in ends) == [Phase.FAILED, Phase.SUCCEEDED, Phase.SUCCEEDED]
    host, on_worker = fleet.settings.host, {"driver": "inmemory"}

    async def counted() -> bool:  # the worker counts an event once it is published
        samples = await scrape(fleet, fleet.worker_url)
        jobs = "sandfleet_jobs_total"
        return (
            sample(samples, jobs, phase="succeeded", driver="inmemory", host=host) == 2
            and sample(samples, jobs, phase="failed", driver="inmemory", host=host) == 1
        )

    await eventually(counted, timeout=10)
    samples = await scrape(fleet, fleet.worker_url)
    for stage in ("queued", "creating", "starting", "running"):
        count = sample(samples, "sandfleet_job_stage_seconds_count", stage=stage, **on_worker)
        assert count == 3, stage
    assert (
        sample(samples, "sandfleet_job_stage_seconds_count", stage="gpu_wait", **on_worker) is None
    )
    assert sample(samples, "sandfleet_gpus", state="unhealthy") == 0

    async def slots_free() -> bool:  # each slot is freed after its job's clean-up
        samples = await scrape(fleet, fleet.worker_url)
        return sample(samples, "sandfleet_worker_slots", state="free") == 2

    await eventually(slots_free, timeout=10)

    gateway = await scrape(fleet, fleet.gateway_url)
    assert sample(gateway, "sandfleet_submissions_total", status="accepted") == 3
    shared_queue = job_queue_name("inmemory")  # the jobs named no host
    assert sample(gateway, "sandfleet_queue_messages", queue=shared_queue) == 0
    assert sample(gateway, "sandfleet_queue_messages", queue=SUBMIT_QUEUE) == 0


async def test_a_rejected_submission_is_counted_as_rejected(fleet: Fleet) -> None:
    async with Client(settings=fleet.settings) as client:
        reply = await client.submit({"template": {"image": ""}})
    assert not reply.accepted
    gateway = await scrape(fleet, fleet.gateway_url)
    assert sample(gateway, "sandfleet_submissions_total", status="rejected") == 1
    assert sample(gateway, "sandfleet_submissions_total", status="accepted") is None


def close_connections(vhost: str, name: str) -> int:
    """Close, from the broker's side, this vhost's connections whose name holds `name`."""
    listed = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
    pids = [
        line.split("\t")[0]
        for line in listed.splitlines()
        # the whole name, quoted: not the worker's logs connection ("… logs")
        if f"\t{vhost}\t" in line and f'"{name}"' in line
    ]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test: a dropped connection")
    return len(pids)


@pytest.mark.parametrize("process", ["gateway", "worker"])
async def test_healthz_says_503_while_the_broker_connection_is_down(
    fleet: Fleet, process: str
) -> None:
    url = fleet.gateway_url if process == "gateway" else fleet.worker_url
    name = f"sandfleet-gateway@{fleet.settings.host}"
    if process == "worker":
        name = f"sandfleet-worker {fleet.worker.identity.worker_id}"
    assert await health(fleet, url) == 200
    vhost = vhost_of(fleet.settings.broker_url)
    assert await asyncio.to_thread(close_connections, vhost, name) == 1

    async def says(status: int) -> bool:
        return await health(fleet, url) == status

    await eventually(lambda: says(503), timeout=10, interval=0.02)
    await eventually(lambda: says(200), timeout=30)


@pytest.mark.parametrize("process", ["gateway", "worker"])
async def test_healthz_says_503_until_the_channel_work_comes_on_is_reopened(
    fleet: Fleet, process: str
) -> None:
    """A connection is up again before its channels are restored, and a restore can fail
    and wait for the next try: until the channel submissions or jobs come on is open,
    none come, and health says so (a CI run saw a worker at 200 with it closed)."""
    if process == "gateway":
        url, channel = fleet.gateway_url, fleet.gateway._channel
        healthy: Callable[[], bool] = lambda: fleet.gateway.healthy  # noqa: E731
    else:
        assert fleet.worker._connected is not None
        url, channel = fleet.worker_url, fleet.worker._connected.intake.channel
        healthy = lambda: fleet.worker.healthy  # noqa: E731
    assert channel is not None and healthy()
    # Closed under the robust channel, as a broker's channel error would: it reopens it.
    await (await channel.get_underlay_channel()).close()
    assert not healthy()

    async def says_200() -> bool:
        return await health(fleet, url) == 200

    await eventually(says_200, timeout=30)
    assert not channel.is_closed


async def test_the_gateway_reads_queue_depths_under_its_own_role(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """With `broker setup`'s accounts: a job for a host with no worker running waits in
    that host's queue, and the gateway, as its role, counts it."""
    settings = make_settings()
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    users = await set_up_broker(
        settings,
        admin_url=DEFAULT_ADMIN_URL,
        credentials=CredentialsFile(tmp_path / "broker-users.json"),
        hosts=[settings.host],
        submitters=[alice],
        drivers=["inmemory"],
    )
    try:
        async with Gateway(settings.model_copy(update={"broker_url": users.gateway})) as gateway:
            async with Client(users.submitters[alice]) as client:
                job = {**request(), "placement": {"host": settings.host}}
                assert (await client.submit(job)).accepted
            await gateway.refresh_metrics()
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", alice)
    depth = gateway.metrics.registry.get_sample_value
    host_queue = job_queue_name("inmemory", settings.host)
    assert depth("sandfleet_queue_messages", {"queue": host_queue}) == 1
    assert depth("sandfleet_queue_messages", {"queue": SUBMIT_QUEUE}) == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("command", "setting"),
    [(["gateway"], "--metrics-port"), (["worker", "--driver", "inmemory"], "env")],
)
async def test_the_commands_serve_metrics_and_health_on_the_port_asked(
    settings: Settings, command: list[str], setting: str
) -> None:
    """`--metrics-port` or SANDFLEET_METRICS_PORT, on a real `sandfleet` process."""
    port = free_port()
    env = sandfleet_env(
        settings,
        SANDFLEET_STATE_DIR=str(settings.state_dir),
        SANDFLEET_JOURNAL_DIR=str(settings.journal_dir),
    )
    args = [*command]
    if setting == "env":
        env["SANDFLEET_METRICS_PORT"] = str(port)
    else:
        args += ["--metrics-port", str(port)]
    process = await spawn_sandfleet(env, *args)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                try:
                    async with http.get(f"{url}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:  # not listening yet
                    return False

            await eventually(healthy, timeout=30)
            async with http.get(f"{url}/metrics") as response:
                text = await response.text()
        names = {family.name for family in text_string_to_metric_families(text)}
        assert names & {"sandfleet_submissions", "sandfleet_worker_slots"}
    finally:
        process.terminate()
        await asyncio.wait_for(process.communicate(), 40)
