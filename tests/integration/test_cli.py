"""The `sandfleet` command as a person runs it, against a real broker and worker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.conftest import WorkerFactory
from tests.support import until_terminal

pytestmark = pytest.mark.integration


async def sandfleet(settings: Settings, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": settings.broker_url,
        "SANDFLEET_HOST": settings.host,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandfleet", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_submit_wait_exits_with_the_jobs_outcome(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    async with docker_worker():
        ok_rc, ok_out = await sandfleet(
            settings,
            "submit",
            "--json",
            "--wait",
            "--image",
            test_image,
            "--",
            "sh",
            "-c",
            "echo fine",
        )
        bad_rc, bad_out = await sandfleet(
            settings,
            "submit",
            "--wait",
            "--image",
            test_image,
            "--",
            "sh",
            "-c",
            "echo broke; exit 4",
        )
    assert ok_rc == 0, ok_out
    lines = [json.loads(line) for line in ok_out.splitlines()]
    assert lines[0]["status"] == "accepted"
    assert [line["phase"] for line in lines[1:]] == ["starting", "running", "succeeded"]
    assert lines[-1]["output"] == "fine\n"
    assert bad_rc == 1
    assert "failed" in bad_out and "exit=4" in bad_out and "| broke" in bad_out


async def test_submit_rejection_prints_field_paths_and_exits_2(
    settings: Settings, client: Client
) -> None:
    rc, out = await sandfleet(settings, "submit", "--image", "x", "--gpu-count", "0", "--", "true")
    assert rc == 2
    assert "rejected" in out
    assert "resource_requirements.gpu.count" in out


async def test_watch_from_start_and_status_replay_past_events(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    job_id = f"t-{uuid.uuid4().hex[:10]}"
    request = {"job_id": job_id, "template": {"image": test_image, "command": ["true"]}}
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(request)).accepted
        await until_terminal(stream, job_id)

    # The job is over; watch must replay it from the log. watch never ends by itself,
    # so read its lines until the terminal one, then stop it.
    env = {**os.environ, "SANDFLEET_BROKER_URL": settings.broker_url}
    watcher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandfleet", "watch", "--from-start", "--job", job_id, "--json",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert watcher.stdout is not None
    phases: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not phases or not Phase(phases[-1]).is_terminal:
                phases.append(json.loads(await watcher.stdout.readline())["phase"])
    finally:
        watcher.terminate()
        await watcher.wait()
    assert phases == ["accepted", "starting", "running", "succeeded"]

    rc, out = await sandfleet(settings, "status", job_id, "--json")
    assert rc == 0
    status = json.loads(out)
    assert status["phase"] == "succeeded"
    assert [e["phase"] for e in status["events"]] == phases
    rc, _ = await sandfleet(settings, "status", "no-such-job")
    assert rc == 1
