"""`sandfleet top --once` against a real broker, gateway and worker running a job."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support import until_phase, until_terminal
from tests.support.cli import run_sandfleet, sandfleet_env, spawn_sandfleet
from tests.support.processes import start_worker

pytestmark = pytest.mark.integration


async def test_top_once_shows_the_host_worker_slots_and_running_job(
    settings: Settings, client: Client
) -> None:
    job_id = f"top-{uuid.uuid4().hex[:8]}"
    request = {
        "job_id": job_id,
        "driver": "inmemory",
        "template": {
            "image": "none",
            "command": ["true"],
            "driver_config": {"inmemory": {"run_seconds": 120}},
        },
    }
    worker, first_beat = await start_worker(settings, client, "--slots", "2", driver="inmemory")
    try:
        async with client.events(job_id=job_id) as stream:
            assert (await client.submit(request)).accepted
            await until_phase(stream, job_id, Phase.RUNNING, timeout=30)
            env = sandfleet_env(settings, COLUMNS="250")  # wide enough for whole ids
            as_json = await run_sandfleet(env, "top", "--once", "--json")
            as_text = await run_sandfleet(env, "top", "--once")
            await client.cancel(job_id)
            await until_terminal(stream, job_id)
    finally:
        worker.kill()
        await worker.wait()

    assert as_json.returncode == 0, as_json
    [snapshot] = as_json.json_lines
    [job] = [row for row in snapshot["jobs"] if row["job_id"] == job_id]
    assert (job["phase"], job["driver"], job["host"], job["worker_id"]) == (
        "running", "inmemory", settings.host, first_beat.worker_id,
    )  # fmt: skip
    [worker_row] = [w for w in snapshot["workers"] if w["worker_id"] == first_beat.worker_id]
    assert (worker_row["state"], worker_row["slots_used"], worker_row["slots_free"]) == (
        "alive", 1, 1,
    )  # fmt: skip
    [host] = [h for h in snapshot["hosts"] if h["host"] == settings.host]
    assert (host["workers_alive"], host["slots_used"], host["slots_free"], host["jobs"]) == (
        1, 1, 1, 1,
    )  # fmt: skip

    assert as_text.returncode == 0, as_text
    for shown in (settings.host, first_beat.worker_id or "", job_id, "running", "inmemory"):
        assert shown in as_text.stdout


async def test_top_with_no_broker_is_one_line_and_exit_3() -> None:
    env = {**os.environ, "SANDFLEET_BROKER_URL": "amqp://guest:pw@127.0.0.1:1/"}
    ran = await run_sandfleet(env, "top", "--once")
    assert (ran.returncode, ran.stdout) == (3, "")
    assert ran.stderr.startswith("sandfleet: cannot reach the fleet at amqp://guest:***@")
    assert ran.stderr.count("\n") == 1


async def test_top_json_draws_live_events_into_later_frames(
    settings: Settings, client: Client
) -> None:
    top = await spawn_sandfleet(sandfleet_env(settings), "top", "--json", "--refresh", "0.2")
    assert top.stdout is not None
    try:
        first = json.loads(await asyncio.wait_for(top.stdout.readline(), 30))
        worker, first_beat = await start_worker(settings, client, driver="inmemory")
        try:
            async with asyncio.timeout(30):
                while True:  # frames come every 0.2 s; the worker's shows up in one
                    frame = json.loads(await top.stdout.readline())
                    if any(w["worker_id"] == first_beat.worker_id for w in frame["workers"]):
                        break
        finally:
            worker.kill()
            await worker.wait()
    finally:
        top.terminate()
        await top.wait()
    assert all(w["worker_id"] != first_beat.worker_id for w in first["workers"])
