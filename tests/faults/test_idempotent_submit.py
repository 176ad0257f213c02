"""Submitting the same job_id twice never creates two sandboxes; the second submission
is answered with the existing job's state."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.gateway.job_index import JobIndex
from sandfleet.gateway.job_view import JobView
from tests.support import until_terminal
from tests.support.runtimes import WorkerFactory, sandboxes_created

pytestmark = pytest.mark.integration


def request(image: str, job_id: str, *command: str) -> dict[str, Any]:
    return {"job_id": job_id, "template": {"image": image, "command": list(command) or ["true"]}}


async def test_resubmitting_a_finished_job_returns_its_state(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    tmp_path: Path,
) -> None:
    job_id = f"i-{uuid.uuid4().hex[:8]}"
    since = time.time()
    async with docker_worker(), client.events(job_id=job_id) as stream:
        first = await client.submit(request(test_image, job_id))
        await until_terminal(stream, job_id)
        again = await client.submit(request(test_image, job_id, "echo", "different"))
    assert first.accepted and not first.duplicate
    assert again.accepted and again.duplicate
    assert again.phase is Phase.SUCCEEDED
    history = await client.history(job_id)
    assert [e.phase for e in history].count(Phase.ACCEPTED) == 1
    assert sandboxes_created("docker", since)[job_id] == 1

    # A gateway started later, its view empty, knows it too: it reads the event log.
    view = JobView(tmp_path / "new" / "view.sqlite3", log="new", max_age_seconds=3600, host="g")
    await view.open()
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        index = JobIndex(await connection.channel(), view)
        await index.start()
        assert index.existing(job_id) is Phase.SUCCEEDED
    await view.aclose()


async def test_concurrent_twins_run_once(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    job_id = f"i-{uuid.uuid4().hex[:8]}"
    since = time.time()
    async with docker_worker(slots=2), client.events(job_id=job_id) as stream:
        replies = await asyncio.gather(
            *(client.submit(request(test_image, job_id, "sleep", "1")) for _ in range(5))
        )
        await until_terminal(stream, job_id)
    assert sorted(bool(r.duplicate) for r in replies) == [False, True, True, True, True]
    assert all(r.accepted for r in replies)
    assert sandboxes_created("docker", since)[job_id] == 1


async def test_a_rejected_job_id_may_be_submitted_again(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    job_id = f"i-{uuid.uuid4().hex[:8]}"
    bad = await client.submit({"job_id": job_id, "template": {"image": ""}})
    assert not bad.accepted
    async with docker_worker():
        good = await client.submit(request(test_image, job_id))
    assert good.accepted and not good.duplicate
