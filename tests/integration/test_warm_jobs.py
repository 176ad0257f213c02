"""Warm pools on real runtimes (dockerd, the podman service) and a real broker: a job
taken by a warm sandbox is the job's in everything (output, exit code, environment,
limits), sees nothing of the job before it, is adopted once after its worker is
SIGKILLed, and is cancelled and timed out as a cold one is."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from sandfleet.workers.drivers.base import LABEL_POOL, LABEL_WORKER_ID, SandboxDriver
from sandfleet.workers.runtime import Worker
from tests.support import eventually, submit_and_wait, until_phase, until_terminal
from tests.support.processes import signal_and_wait, start_worker
from tests.support.runtimes import WorkerFactory, docker_sandboxes_named, registered_driver

pytestmark = pytest.mark.integration

CPU, MEMORY = 0.5, 64 << 20


def pools(image: str, count: int = 1) -> str:
    """SANDFLEET_WARM_POOLS for jobs of `image` asking 0.5 CPU and 64 MiB."""
    return json.dumps([{"image": image, "count": count, "cpu": CPU, "memory": MEMORY}])


def warm_request(image: str, script: str, **template: Any) -> dict[str, Any]:
    return {
        "job_id": f"w-{uuid.uuid4().hex[:8]}",
        "resource_requirements": {"cpu": "500m", "memory": "64Mi"},
        "template": {"image": image, "command": ["sh", "-c", script], **template},
    }


@asynccontextmanager
async def warm_worker(factory: WorkerFactory, image: str, count: int = 1) -> AsyncIterator[Worker]:
    async with factory(slots=2, warm_pools=pools(image, count)) as worker:
        async with asyncio.timeout(60):
            await worker.warm.full.wait()
        yield worker


def ran_warm(events: list[Event]) -> bool:
    running = [e for e in events if e.phase is Phase.RUNNING]
    return len(running) == 1 and running[0].message.startswith("warm (pool ")


@pytest.mark.parametrize("runtime", ["docker", "podman"])
async def test_a_warm_job_has_its_own_output_exit_code_environment_and_limits(
    runtime: str,
    client: Client,
    request: pytest.FixtureRequest,
    test_image: str,
) -> None:
    factory: WorkerFactory = request.getfixturevalue(f"{runtime}_worker")
    image = test_image if runtime == "docker" else request.getfixturevalue("podman_image")
    cgroup = "/sys/fs/cgroup"  # v2, or v1's controllers (this machine's)
    script = (
        'printf "%s|" "$GREETING"; echo "$@"; '
        f"cat {cgroup}/memory.max 2>/dev/null || cat {cgroup}/memory/memory.limit_in_bytes; "
        f"cat {cgroup}/cpu.max 2>/dev/null || cat {cgroup}/cpu/cpu.cfs_quota_us; "
        "echo to-stderr >&2; exit 3"
    )
    job = warm_request(image, script, environment={"GREETING": "it's $HOME\nthere"})
    job["driver"] = runtime
    job["template"]["command"] += ["argv0", "two words", "'quoted'"]
    async with warm_worker(factory, image):
        events = await submit_and_wait(client, job)
        lines = [line async for line in client.logs(job["job_id"])]
    assert ran_warm(events), [(e.phase, e.message) for e in events]
    assert Phase.STARTING not in [e.phase for e in events]  # nothing was made for it
    last = events[-1]
    assert (last.phase, last.exit_code) == (Phase.FAILED, 3)
    assert last.output is not None
    assert last.output.startswith("it's $HOME\nthere|two words 'quoted'\n")
    assert f"\n{MEMORY}\n" in last.output  # the job's 64Mi
    assert "\n50000 100000\n" in last.output or "\n50000\n" in last.output  # its 0.5 CPU
    assert "to-stderr" in last.output
    assert lines == last.output.splitlines()  # its log is its own, from its first line


async def test_the_next_warm_job_sees_nothing_the_previous_one_left(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    async with warm_worker(docker_worker, test_image) as worker:
        first = await submit_and_wait(
            client, warm_request(test_image, "echo secret > /tmp/left; echo secret > /left")
        )
        await worker.warm.full.wait()  # refilled
        second = await submit_and_wait(
            client, warm_request(test_image, "test ! -e /tmp/left && test ! -e /left")
        )
    assert ran_warm(first) and ran_warm(second)
    assert first[-1].sandbox_id != second[-1].sandbox_id
    assert second[-1].phase is Phase.SUCCEEDED, second[-1].output


async def test_a_job_asking_other_resources_starts_cold(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    job = warm_request(test_image, "true")
    job["resource_requirements"]["cpu"] = 1
    async with warm_worker(docker_worker, test_image) as worker:
        events = await submit_and_wait(client, job)
        assert len(worker.warm.pools[0].ready) == 1  # untouched
    assert not ran_warm(events)
    assert [e.reason for e in events if e.phase is Phase.STARTING] == ["Creating"]
    assert events[-1].phase is Phase.SUCCEEDED


async def test_a_warm_job_is_cancelled_and_another_timed_out_as_cold_ones_are(
    client: Client, docker_worker: WorkerFactory, test_image: str, docker: aiodocker.Docker
) -> None:
    cancelled = warm_request(test_image, "echo up; sleep 600")
    timed_out = warm_request(test_image, "echo up; sleep 600", timeout_seconds=2)
    async with warm_worker(docker_worker, test_image, count=2):
        async with client.events(job_id=cancelled["job_id"]) as stream:
            assert (await client.submit(cancelled)).accepted
            running = await until_phase(stream, cancelled["job_id"], Phase.RUNNING)
            await client.cancel(cancelled["job_id"], reason="not needed")
            ended = (await until_terminal(stream, cancelled["job_id"]))[-1]
        timed = await submit_and_wait(client, timed_out)
    assert running.message.startswith("warm (pool ") and ran_warm(timed)
    assert (ended.phase, ended.output) == (Phase.CANCELLED, "up\n")
    assert (timed[-1].phase, timed[-1].output) == (Phase.TIMED_OUT, "up\n")
    for job in (cancelled, timed_out):
        assert not await docker.containers.list(
            all=True, filters=json.dumps({"name": [f"^/sandfleet-{job['job_id']}$"]})
        )


async def warm_containers_of(docker: aiodocker.Docker, worker_id: str) -> list[Any]:
    """The untaken and taken warm containers a worker made."""
    filters = json.dumps({"label": [LABEL_POOL, f"{LABEL_WORKER_ID}={worker_id}"]})
    return list(await docker.containers.list(all=True, filters=filters))


@asynccontextmanager
async def killed_while_warm_job_runs(
    settings: Settings,
    client: Client,
    job: dict[str, Any],
    *,
    driver: str,
    env: dict[str, str],
    seconds: float,
) -> AsyncIterator[tuple[EventStream, str, Event]]:
    """A worker process with a full pool of 2 runs `job` warm and is SIGKILLed: yields
    the job's event stream, the dead worker's id and the job's `running` event. The pool
    must fill within `seconds`, the job run within half of it."""
    async with client.events(phases={Phase.HEARTBEAT}, host=settings.host) as beats:
        killed, _ = await start_worker(settings, client, driver=driver, env=env)
        try:
            dead = await worker_with_full_pool(beats, ready=2, seconds=seconds)
            async with client.events(job_id=job["job_id"]) as stream:
                assert (await client.submit(job)).accepted
                job_id = job["job_id"]
                running = await until_phase(stream, job_id, Phase.RUNNING, timeout=seconds / 2)
                await signal_and_wait(killed, signal.SIGKILL)
                yield stream, dead, running
        finally:
            if killed.returncode is None:
                killed.kill()
                await killed.wait()


async def test_a_warm_job_whose_worker_is_killed_is_adopted_once_and_its_pool_removed(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    job = warm_request(test_image, "echo one; sleep 3; echo two")
    since = time.time()
    env = {"SANDFLEET_WARM_POOLS": pools(test_image, count=2)}
    killed = killed_while_warm_job_runs(settings, client, job, driver="docker", env=env, seconds=60)
    async with killed as (stream, dead, running), docker_worker():
        history = await until_terminal(stream, job["job_id"], timeout=60)
        await eventually(lambda: no_warm_left(docker, dead), timeout=30)
    assert running.message.startswith("warm (pool ")
    assert [e.reason for e in history if e.phase is Phase.RUNNING] == ["Adopted"]
    assert (history[-1].phase, history[-1].output) == (Phase.SUCCEEDED, "one\ntwo\n")
    assert docker_sandboxes_named(since)[job["job_id"]] == 1  # one sandbox ever bore its name


async def worker_with_full_pool(beats: EventStream, *, ready: int, seconds: float = 60) -> str:
    """The id of the worker whose heartbeat first says its pool holds `ready` sandboxes."""
    async with asyncio.timeout(seconds):
        async for beat in beats:
            if beat.health and beat.health.warm_pools[0]["ready"] == ready and beat.worker_id:
                return beat.worker_id
    raise AssertionError("the event stream ended")


async def no_warm_left(docker: aiodocker.Docker, worker_id: str) -> bool:
    return not await warm_containers_of(docker, worker_id)


async def test_a_stopped_worker_removes_its_idle_warm_sandboxes(
    docker_worker: WorkerFactory, test_image: str, docker: aiodocker.Docker
) -> None:
    async with warm_worker(docker_worker, test_image, count=2) as worker:
        made = worker.identity.worker_id
        assert len(await warm_containers_of(docker, made)) == 2
    assert await warm_containers_of(docker, made) == []


def vm_pools(guest: dict[str, str], count: int = 2) -> str:
    block = {"initrd": guest["initrd"]}
    return json.dumps([{"image": guest["kernel"], "count": count, "driver_config": block}])


def vm_request(guest: dict[str, str], script: str, **template: Any) -> dict[str, Any]:
    return {
        "job_id": f"wv-{uuid.uuid4().hex[:8]}",
        "driver": "vm",
        "template": {
            "image": guest["kernel"],
            "command": ["sh", "-c", script],
            "environment": {"GREETING": "hello $there"},
            "driver_config": {"vm": {"initrd": guest["initrd"]}},
            **template,
        },
    }


async def test_a_warm_vm_job_runs_in_a_booted_guest_and_ends_as_a_cold_one(
    client: Client, vm_worker: WorkerFactory, vm_guest: dict[str, str]
) -> None:
    """`running` means the command started in the guest, warm as cold; the boot was the
    pool's, so a warm job has no `starting`. Cancelled and timed out as cold ones are."""
    ran = vm_request(vm_guest, 'echo "$GREETING"; exit 4')
    cancelled = vm_request(vm_guest, "echo up; sleep 600")
    timed_out = vm_request(vm_guest, "echo up; sleep 600", timeout_seconds=3)
    async with vm_worker(slots=2, warm_pools=vm_pools(vm_guest)) as worker:
        async with asyncio.timeout(240):
            await worker.warm.full.wait()
        events = await submit_and_wait(client, ran, timeout=120)
        async with client.events(job_id=cancelled["job_id"]) as stream:
            assert (await client.submit(cancelled)).accepted
            running = await until_phase(stream, cancelled["job_id"], Phase.RUNNING, timeout=120)
            await client.cancel(cancelled["job_id"], reason="not needed")
            ended = (await until_terminal(stream, cancelled["job_id"], timeout=120))[-1]
        async with asyncio.timeout(240):
            await worker.warm.full.wait()
        timed = await submit_and_wait(client, timed_out, timeout=120)
    assert ran_warm(events), [(e.phase, e.reason, e.message) for e in events]
    assert Phase.STARTING not in [e.phase for e in events]
    assert (events[-1].phase, events[-1].exit_code) == (Phase.FAILED, 4)
    assert events[-1].output is not None and "hello $there" in events[-1].output
    assert running.message.startswith("warm (pool ")
    assert ended.phase is Phase.CANCELLED
    assert ran_warm(timed) and (timed[-1].phase, timed[-1].output) == (Phase.TIMED_OUT, "up\n")


async def test_a_warm_vm_job_whose_worker_is_killed_is_adopted_once_and_its_pool_removed(
    settings: Settings,
    client: Client,
    vm_worker: WorkerFactory,
    vm_guest: dict[str, str],
    vm_work_dir: Path,
) -> None:
    job = vm_request(vm_guest, "echo one; sleep 4; echo two")
    env = {
        "SANDFLEET_WARM_POOLS": vm_pools(vm_guest),
        "SANDFLEET_VM_DOMAIN_TYPE": "qemu",
        "SANDFLEET_VM_WORK_DIR": str(vm_work_dir),
    }
    killed = killed_while_warm_job_runs(settings, client, job, driver="vm", env=env, seconds=240)
    async with killed as (stream, dead, running), vm_worker():
        history = await until_terminal(stream, job["job_id"], timeout=120)
        driver = registered_driver("vm", domain_type="qemu", work_dir=vm_work_dir)(settings)
        try:
            await eventually(lambda: no_idle_guests_of(driver, dead), timeout=60)
        finally:
            await driver.aclose()
    assert running.message.startswith("warm (pool ")
    assert [e.reason for e in history if e.phase is Phase.RUNNING] == ["Adopted"]
    assert (history[-1].phase, history[-1].output) == (Phase.SUCCEEDED, "one\ntwo\n")


async def no_idle_guests_of(driver: SandboxDriver[Any], worker_id: str) -> bool:
    """No guest the dead worker made is left but its taken one (that is the job's)."""
    left = await driver.list_sandboxes()
    return not [s for s in left if s.labels.get(LABEL_WORKER_ID) == worker_id and s.job_id is None]
