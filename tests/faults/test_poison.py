"""Poison input ends in the dead-letter queue with an event, and nothing stops serving."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.models import Job
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers.drivers.cdi import ContainerBlock
from sandfleet.workers.drivers.docker.driver import DockerDriver
from sandfleet.workers.drivers.docker.plugin import DockerSettings
from tests.support import until_terminal
from tests.support.broker import dead_letters, raw_submit
from tests.support.runtimes import worker_factory

pytestmark = pytest.mark.integration


async def test_deeply_nested_json_is_rejected_not_requeued(
    settings: Settings, client: Client
) -> None:
    body = b'{"job_id": "deep", "template": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with client.events(phases={Phase.REJECTED}) as stream:
        reply = await raw_submit(settings.broker_url, body)
        events = await until_terminal(stream, str(reply["job_id"]))
    assert reply["status"] == "rejected"
    assert events[-1].reason == "MalformedMessage"
    assert "too deeply" in events[-1].message
    assert await dead_letters(settings.broker_url) == [body]


async def test_oversized_submission_is_rejected(settings: Settings, client: Client) -> None:
    big = json.dumps(
        {"job_id": "big", "template": {"image": "x" * (settings.max_message_bytes + 1)}}
    )
    async with client.events(phases={Phase.REJECTED}) as stream:
        reply = await raw_submit(settings.broker_url, big.encode())
        events = await until_terminal(stream, str(reply["job_id"]))
    assert reply["status"] == "rejected"
    assert "limit is" in events[-1].message
    assert len(await dead_letters(settings.broker_url)) == 1


class CrashingDockerDriver(DockerDriver):
    """A driver whose block parser has a bug: the poison case for a worker."""

    def parse_config(self, job: Job) -> ContainerBlock:
        if job.template.driver_config.get("explode"):
            raise ZeroDivisionError("division by zero")
        return super().parse_config(job)


async def test_block_that_crashes_validation_is_dead_lettered_and_worker_keeps_serving(
    settings: Settings, client: Client, test_image: str
) -> None:
    start = worker_factory(settings, lambda s: CrashingDockerDriver(url=DockerSettings().url))
    poison: dict[str, Any] = {
        "job_id": f"x-{uuid.uuid4().hex[:8]}",
        "template": {"image": test_image, "driver_config": {"docker": {"explode": True}}},
    }
    good: dict[str, Any] = {
        "job_id": f"ok-{uuid.uuid4().hex[:8]}",
        "template": {"image": test_image, "command": ["true"]},
    }
    async with start():
        async with client.events(job_id=poison["job_id"]) as stream:
            assert (await client.submit(poison)).accepted
            events = await until_terminal(stream, poison["job_id"])
        async with client.events(job_id=good["job_id"]) as stream:
            assert (await client.submit(good)).accepted
            after = await until_terminal(stream, good["job_id"])
    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.REJECTED]
    assert events[-1].reason == "DriverConfigCrashed"
    assert "ZeroDivisionError" in events[-1].message
    assert [json.loads(b)["job_id"] for b in await dead_letters(settings.broker_url)] == [
        poison["job_id"]
    ]
    assert after[-1].phase is Phase.SUCCEEDED
