"""Docker and Podman against hostile jobs and hanging runtimes: what each container
gets (inspected on the real runtime, and seen from inside it), image names that are
no references, pulls and creates that never answer."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from sandfleet.common.errors import ImageUnavailable, SandboxError
from sandfleet.common.events import Phase
from sandfleet.common.models import Job
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost, SandboxDriver, SandboxSpec
from sandfleet.workers.drivers.podman.client import LibpodClient
from sandfleet.workers.drivers.podman.plugin import PodmanSettings
from tests.support import submit_and_wait, until_terminal
from tests.support.runtimes import (
    TEST_IMAGE,
    WorkerFactory,
    no_containers,
    registered_driver,
    worker_factory,
)
from tests.support.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration

RUNTIMES = ["docker", "podman"]
# What a container sees of its own limits (cgroup v1 on these hosts).
SELF_REPORT = "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; cat /sys/fs/cgroup/pids/pids.max"


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    # Both images are the same busybox image, built into each runtime's store.
    request.getfixturevalue("test_image" if request.param == "docker" else "podman_image")
    return str(request.param)


Made = Callable[..., Awaitable[SandboxDriver[Any]]]


@pytest.fixture
async def make_driver(runtime: str) -> AsyncIterator[Made]:
    """The runtime's driver as its plugin makes it, with these of its settings."""
    made: list[SandboxDriver[Any]] = []

    async def make(**settings: Any) -> SandboxDriver[Any]:
        plugin = registry.load(runtime)
        made.append(plugin.make(plugin.settings(**settings), DriverHost(cdi_kind="x.y/gpu")))
        return made[-1]

    yield make
    for driver in made:
        await driver.aclose()


def job(runtime: str, *command: str, image: str = TEST_IMAGE) -> Job:
    template = {"image": image, "command": list(command)}
    job_id = f"h-{uuid.uuid4().hex[:10]}"
    return Job.model_validate({"job_id": job_id, "driver": runtime, "template": template})


def spec_of(driver: SandboxDriver[Any], job: Job) -> SandboxSpec[Any]:
    """The job's sandbox as a worker asks for it, its block checked first."""
    return SandboxSpec.for_job(job, driver.parse_config(job), driver=job.driver, worker_id="t")


async def inspect(runtime: str, sandbox_id: str) -> dict[str, Any]:
    """The runtime's own inspect document, through its API."""
    if runtime == "docker":
        async with aiodocker.Docker() as docker:
            return await docker.containers.container(sandbox_id).show()
    libpod = LibpodClient(PodmanSettings().url)
    try:
        info: dict[str, Any] = await libpod.json("GET", "containers", sandbox_id, "json")
        return info
    finally:
        await libpod.aclose()


async def test_every_container_is_bounded_and_holds_only_its_capabilities(
    runtime: str, make_driver: Made
) -> None:
    driver = await make_driver(
        default_cpu="500m", default_memory="64Mi", pids_limit=64,
        log_max_bytes="1M", log_max_files=2, capabilities="CHOWN,KILL",
    )  # fmt: skip
    sandbox = await driver.create(spec_of(driver, job(runtime, "sh", "-c", SELF_REPORT)))
    try:
        info = await inspect(runtime, sandbox.sandbox_id)
        host = info["HostConfig"]
        assert (host["NanoCpus"], host["Memory"], host["PidsLimit"]) == (500_000_000, 64 << 20, 64)
        assert host["SecurityOpt"] == ["no-new-privileges"]
        if runtime == "docker":
            assert (host["CapDrop"], host["CapAdd"]) == (["ALL"], ["CAP_CHOWN", "CAP_KILL"])
            log = {"max-size": "1000000", "max-file": "2"}
            assert host["LogConfig"] == {"Type": "json-file", "Config": log}
        else:
            assert info["EffectiveCaps"] == info["BoundingCaps"] == ["CAP_CHOWN", "CAP_KILL"]
            assert (host["LogConfig"]["Type"], host["LogConfig"]["Size"]) == ("k8s-file", "1MB")
        await driver.start(sandbox.sandbox_id)
        assert await driver.wait(sandbox.sandbox_id) == 0
        # From inside: CHOWN (bit 0) and KILL (bit 5) only, no privilege gain, 64 pids.
        output = await driver.output(sandbox.sandbox_id, lines=10)
        assert output.split() == ["CapEff:", "0000000000000021", "NoNewPrivs:", "1", "64"]
    finally:
        await driver.remove(sandbox.sandbox_id)


async def test_an_unchecked_image_name_never_reaches_another_endpoint(
    runtime: str, make_driver: Made
) -> None:
    # Past the job check (a driver must not rely on it): unencoded, this name made
    # the worker GET the runtime's endless event stream.
    driver = await make_driver(pull_timeout_seconds=60)
    spec = replace(spec_of(driver, job(runtime, "true")), image="x/../../events?")
    with pytest.raises(ImageUnavailable, match=re.escape("x/../../events?")):
        async with asyncio.timeout(20):
            await driver.create(spec)
    assert await driver.find(spec.name) is None


@pytest.fixture
def proxy_socket(tmp_path: Path) -> Path:
    return tmp_path / "runtime.sock"


def runtime_url(runtime: str) -> str:
    plugin = registry.load(runtime)
    return str(plugin.settings().url)


@pytest.mark.parametrize(
    ("stalled", "timeout", "error", "says"),
    [
        # The image is there; its look-up hangs (any /images/ request): the pull timeout
        # bounds the look-up too, not only the pull.
        (b"/images/", "pull_timeout_seconds", ImageUnavailable, r"timed out after 1s"),
        (b"/containers/create", "create_timeout_seconds", SandboxError, r"no answer in 1s"),
    ],
    ids=["pull", "create"],
)
async def test_a_runtime_call_that_never_answers_ends_at_its_timeout(
    runtime: str,
    make_driver: Made,
    proxy_socket: Path,
    stalled: bytes,
    timeout: str,
    error: type[SandboxError],
    says: str,
) -> None:
    async with StallingProxy(runtime_url(runtime), proxy_socket, stalled) as proxy:
        driver = await make_driver(url=proxy.url, **{timeout: 1})
        spec = spec_of(driver, job(runtime, "true"))
        with pytest.raises(error, match=says):
            async with asyncio.timeout(20):
                await driver.create(spec)
        assert proxy.stalled.is_set()
    assert await (await make_driver()).find(spec.name) is None


async def test_a_create_cancelled_while_it_pulls_ends_at_once(
    runtime: str, make_driver: Made, proxy_socket: Path
) -> None:
    async with StallingProxy(runtime_url(runtime), proxy_socket, b"/images/") as proxy:
        driver = await make_driver(url=proxy.url, pull_timeout_seconds=300)
        spec = spec_of(driver, job(runtime, "true"))
        creating = asyncio.create_task(driver.create(spec))
        async with asyncio.timeout(20):
            await proxy.stalled.wait()
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await creating
    assert await (await make_driver()).find(spec.name) is None


async def test_a_job_cancelled_while_its_image_is_pulled_ends_cancelled_at_once(
    settings: Settings, client: Client, test_image: str, proxy_socket: Path
) -> None:
    # Docker only: the worker's part is the same for Podman, whose driver is checked
    # above to end a cancelled pull at once.
    job_id = f"h-{uuid.uuid4().hex[:10]}"
    request = {"job_id": job_id, "driver": "docker", "template": {"image": test_image}}
    async with StallingProxy(runtime_url("docker"), proxy_socket, b"/images/") as proxy:
        stalled_docker = registered_driver("docker", url=proxy.url, pull_timeout_seconds=300)
        async with (
            worker_factory(settings, stalled_docker)(),
            client.events(job_id=job_id) as stream,
        ):
            assert (await client.submit(request)).accepted
            async with asyncio.timeout(30):
                await proxy.stalled.wait()
            await client.cancel(job_id)
            events = await until_terminal(stream, job_id, timeout=20)  # not the 300s pull timeout
    assert (events[-1].phase, events[-1].reason) == (Phase.CANCELLED, "CancelledBeforeStart")
    async with aiodocker.Docker() as docker:
        assert await no_containers(docker, job_id)


@pytest.fixture
def worker(runtime: str, request: pytest.FixtureRequest) -> WorkerFactory:
    factory: WorkerFactory = request.getfixturevalue(f"{runtime}_worker")
    return factory


async def test_a_worker_refuses_a_hostile_image_and_resources_by_field(
    runtime: str, client: Client, worker: WorkerFactory
) -> None:
    request = {
        "job_id": f"h-{uuid.uuid4().hex[:10]}",
        "driver": runtime,
        "resource_requirements": {"cpu": 1000, "memory": "1Ti"},
        "template": {"image": "x/../../events?", "command": ["true"]},
    }
    async with worker():
        events = await submit_and_wait(client, request)
    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.REJECTED]
    assert [e.field for e in events[-1].errors] == [
        "template.image",
        "resource_requirements.cpu",
        "resource_requirements.memory",
    ]
