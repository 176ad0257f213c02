"""The real runtimes the integration and fault tests use, and workers made on them."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import aiodocker

from sandfleet.common.settings import Settings
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost, SandboxDriver
from sandfleet.workers.runtime import Worker

TEST_IMAGE = "sandfleet-test/busybox:latest"
ROOT = Path(__file__).resolve().parents[2]
CDI_SPEC = ROOT / "tests" / "fixtures" / "cdi" / "sandfleet-test-gpu.json"
CDI_DIR = Path("/var/run/cdi")
# A test vendor/class whose CDI spec maps harmless nodes (/dev/null) and sets one env
# var per device. The spec defines devices 0-2, each also under its UUID in the test
# inventory (tests/support/gpus.py), as nvidia-ctk's specs name a GPU both ways; the
# test inventory has 4 GPUs, so test.sandfleet/gpu=3 is a GPU the host has but CDI
# cannot resolve.
TEST_CDI_KIND = "test.sandfleet/gpu"
GUEST_DIR = Path("/var/lib/sandfleet/guest")


WorkerFactory = Callable[..., AbstractAsyncContextManager[Worker]]
DriverFactory = Callable[[Settings], SandboxDriver[Any]]


def registered_driver(name: str, **driver_settings: Any) -> DriverFactory:
    """The driver registered as `name`, made as a worker makes it, with these of its
    own settings (the rest from its SANDFLEET_<NAME>_* defaults)."""
    plugin = registry.load(name)
    return lambda s: plugin.make(
        plugin.settings(**driver_settings), DriverHost(cdi_kind=s.cdi_kind)
    )


def worker_factory(settings: Settings, make_driver: DriverFactory) -> WorkerFactory:
    @asynccontextmanager
    async def start(*, slots: int = 1, **overrides: Any) -> AsyncIterator[Worker]:
        worker_settings = Settings(**{**settings.model_dump(), **overrides})  # validated
        driver = make_driver(worker_settings)
        try:
            async with Worker(worker_settings, driver, slots=slots, drain_seconds=5) as worker:
                yield worker
        finally:
            await driver.aclose()

    return start


async def containers_of(docker: aiodocker.Docker, job_id: str) -> list[Any]:
    """Every container, running or not, labelled with this job id."""
    filters = json.dumps({"label": [f"sandfleet.job_id={job_id}"]})
    return list(await docker.containers.list(all=True, filters=filters))


async def no_containers(docker: aiodocker.Docker, job_id: str) -> bool:
    return not await containers_of(docker, job_id)


def sandboxes_created(driver: str, since: float) -> Counter[str]:
    """Containers created per job id, from the runtime's own event log."""
    if driver == "docker":
        command = [
            "docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
            "--filter", "type=container", "--filter", "event=create",
            "--format", '{{index .Actor.Attributes "sandfleet.job_id"}}',
        ]  # fmt: skip
    else:
        command = [
            "podman", "events", "--stream=false", "--since", f"{since:.3f}",
            "--filter", "event=create", "--format", "{{.Name}}",
        ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    names = (line.removeprefix("sandfleet-") for line in out.stdout.split())
    return Counter(name for name in names if name)


def docker_sandboxes_named(since: float) -> Counter[str]:
    """Per job id, how many containers came to bear its sandbox's name since `since`:
    created under it (cold) or renamed to it (a warm container taken). A job's one
    sandbox counts 1 either way; from dockerd's recent events (its last 256)."""
    command = [
        "docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
        "--filter", "type=container", "--filter", "event=create", "--filter", "event=rename",
        "--format", '{{index .Actor.Attributes "name"}}',
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    names = (line.strip().lstrip("/") for line in out.stdout.splitlines())
    return Counter(n.removeprefix("sandfleet-") for n in names if n.startswith("sandfleet-"))


@contextmanager
def docker_creations() -> Iterator[Counter[str]]:
    """Containers Docker creates while the block runs, per job id, counted live.

    `sandboxes_created` asks dockerd for past events, and dockerd keeps only its last
    256 events of every kind: for more than a few dozen jobs it undercounts, and a
    duplicate sandbox could go unseen. This follows the events as they happen; the
    counter holds every creation the block waited for (a job's terminal event comes
    long after its container's creation)."""
    created: Counter[str] = Counter()
    # From now (whatever happens before the follower has subscribed), then live.
    command = [
        "docker", "events", "--since", f"{time.time():.3f}",
        "--filter", "type=container", "--filter", "event=create",
        "--format", '{{index .Actor.Attributes "sandfleet.job_id"}}',
    ]  # fmt: skip
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert follower.stdout is not None
    reader = threading.Thread(target=_count_lines, args=(follower.stdout, created), daemon=True)
    reader.start()
    try:
        yield created
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        reader.join(timeout=30)


def _count_lines(lines: IO[str], counter: Counter[str]) -> None:
    for line in lines:
        if line.strip():
            counter[line.strip()] += 1
