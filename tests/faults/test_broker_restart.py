"""A broker restart while jobs flow: gateway, worker and client reconnect by
themselves, consumers come back, and no accepted job is lost or duplicated."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.gateway.client import Client
from tests.support import until_phase, until_terminal
from tests.support.runtimes import WorkerFactory, sandboxes_created

pytestmark = pytest.mark.integration


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def job(image: str, command: str) -> dict[str, Any]:
    return {
        "job_id": f"r-{uuid.uuid4().hex[:8]}",
        "template": {"image": image, "command": ["sh", "-c", command]},
    }


async def test_broker_restart_loses_and_duplicates_nothing(
    client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    since = time.time()
    through = job(test_image, "echo before; sleep 8; echo after")
    fresh = job(test_image, "echo fresh")
    async with (
        docker_worker(slots=2),
        client.events(job_id=through["job_id"]) as through_events,
        client.events(job_id=fresh["job_id"]) as fresh_events,
    ):
        assert (await client.submit(through)).accepted
        await until_phase(through_events, through["job_id"], Phase.RUNNING)

        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")

        # The job that ran through the outage reports once it is over...
        before = await until_terminal(through_events, through["job_id"], timeout=90)
        # ...and consumers are back: a job submitted after the restart runs too.
        async with asyncio.timeout(60):
            while True:
                try:
                    reply = await client.submit(fresh, timeout=5)
                    break
                except (TimeoutError, ConnectionError):
                    continue  # the client's own connection is still coming back
        assert reply.accepted
        after = await until_terminal(fresh_events, fresh["job_id"], timeout=60)

    assert before[-1].phase is Phase.SUCCEEDED
    assert before[-1].output == "before\nafter\n"
    assert after[-1].phase is Phase.SUCCEEDED
    for job_id in (through["job_id"], fresh["job_id"]):
        history = await client.history(job_id)
        assert [e.phase for e in history].count(Phase.SUCCEEDED) == 1
        assert sandboxes_created("docker", since)[job_id] == 1
