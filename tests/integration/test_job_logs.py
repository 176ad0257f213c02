"""Jobs' output on the log stream, through real workers: followed live with
`sandfleet logs -f`, read after the sandbox is gone, capped per job."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.job_logs import truncation_line
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support import eventually, submit_and_wait, until_phase
from tests.support.cli import run_sandfleet, sandfleet_env, spawn_sandfleet
from tests.support.runtimes import WorkerFactory, no_containers

pytestmark = pytest.mark.integration


def printing(image: str, script: str, *, driver: str = "docker") -> dict[str, Any]:
    return {
        "job_id": f"l-{uuid.uuid4().hex[:10]}",
        "driver": driver,
        "template": {"image": image, "command": ["sh", "-c", script]},
    }


async def test_a_follower_sees_each_line_while_the_job_runs(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    job = printing(test_image, "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.5; done")
    env = sandfleet_env(settings)
    async with docker_worker(), client.events(job_id=job["job_id"]) as stream:
        assert (await client.submit(job)).accepted
        await until_phase(stream, job["job_id"], Phase.RUNNING, timeout=60)
        follower = await spawn_sandfleet(env, "logs", "-f", job["job_id"])
        assert follower.stdout is not None
        async with asyncio.timeout(30):
            first = await follower.stdout.readline()
            second = await follower.stdout.readline()
        # Two lines in, the job (4 s of printing) is still running.
        running = (await client.history(job["job_id"]))[-1].phase
        async with asyncio.timeout(60):
            rest, _ = await follower.communicate()
    assert (first, second) == (b"line 1\n", b"line 2\n")
    assert running is Phase.RUNNING
    assert rest.decode().splitlines() == [f"line {i}" for i in range(3, 9)]
    assert follower.returncode == 0


async def test_logs_outlive_the_sandbox(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    job = printing(test_image, "echo out; echo err >&2; echo last >&2")
    async with docker_worker():
        [*_, done] = await submit_and_wait(client, job)
    assert done.phase is Phase.SUCCEEDED
    await eventually(lambda: no_containers(docker, job["job_id"]))
    env = sandfleet_env(settings)
    everything = await run_sandfleet(env, "logs", job["job_id"])
    tail = await run_sandfleet(env, "logs", "--tail", "1", job["job_id"])
    unknown = await run_sandfleet(env, "logs", "never-submitted")
    # stdout and stderr are two pipes: the runtime orders lines within each, not across.
    lines = everything.stdout.splitlines()
    assert everything.returncode == 0
    assert sorted(lines) == ["err", "last", "out"] and lines.index("err") < lines.index("last")
    assert (tail.returncode, tail.stdout) == (0, lines[-1] + "\n")
    assert unknown.returncode == 4, unknown


async def test_a_flood_is_cut_at_the_cap_and_holds_up_no_other_job(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    cap = 100_000
    flood = printing(test_image, "seq 1 200000")
    quiet = printing(test_image, "echo quiet")
    async with docker_worker(slots=2, max_log_bytes_per_job=cap):
        flooding = asyncio.create_task(submit_and_wait(client, flood, timeout=120))
        async with client.events(job_id=flood["job_id"]) as stream:
            await until_phase(stream, flood["job_id"], Phase.RUNNING, timeout=60)
        [*_, quiet_done] = await submit_and_wait(client, quiet, timeout=60)
        [*_, flood_done] = await flooding
    lines = [line async for line in client.logs(flood["job_id"])]
    quiet_lines = [line async for line in client.logs(quiet["job_id"])]
    assert (quiet_done.phase, flood_done.phase) == (Phase.SUCCEEDED, Phase.SUCCEEDED)
    assert quiet_lines == ["quiet"]
    assert lines[-1] == truncation_line(cap).decode().rstrip("\n")
    shipped = "".join(line + "\n" for line in lines[:-1])
    assert len(shipped.encode()) <= cap + 1  # + the newline ending a line cut in two
    assert lines[:3] == ["1", "2", "3"]


async def test_podman_ships_its_jobs_output(
    settings: Settings, client: Client, podman_worker: WorkerFactory, podman_image: str
) -> None:
    job = printing(podman_image, "echo one; echo two; echo three >&2", driver="podman")
    async with podman_worker():
        [*_, done] = await submit_and_wait(client, job)
    lines = [line async for line in client.logs(job["job_id"], follow=True)]
    assert done.phase is Phase.SUCCEEDED
    assert sorted(lines) == ["one", "three", "two"] and lines.index("one") < lines.index("two")


async def test_output_past_dockers_log_file_rotation_is_shipped_whole(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    """200,000 lines are more than one json-file log file (10 MiB): docker's follow lets
    go at the rotation when the container ends just after; the rest is read again."""
    job = printing(test_image, "seq 1 200000")
    async with docker_worker():
        [*_, done] = await submit_and_wait(client, job, timeout=120)
    lines = [line async for line in client.logs(job["job_id"])]
    assert done.phase is Phase.SUCCEEDED
    assert (len(lines), lines[0], lines[-1]) == (200_000, "1", "200000")


async def test_following_a_job_that_never_started_ends_with_its_terminal_event(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    """Rejected by the worker (an unknown key in its block), the job has no sandbox and
    no end-of-log message: its `rejected` event ends the follow."""
    job = printing(test_image, "echo never")
    job["template"]["driver_config"] = {"docker": {"no_such_key": 1}}
    async with docker_worker():
        [*_, done] = await submit_and_wait(client, job)
        async with asyncio.timeout(30):
            lines = [line async for line in client.logs(job["job_id"], follow=True)]
    assert (done.phase, lines) == (Phase.REJECTED, [])
