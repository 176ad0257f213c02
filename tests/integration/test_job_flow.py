"""The foundation path end to end: raw AMQP or client → gateway → Docker worker → events."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import aiodocker
import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.common.topology import declare_job_queue, job_queue_name
from sandfleet.gateway.client import Client
from tests.support import eventually, until_phase, until_terminal
from tests.support.broker import dead_letters, raw_submit, ready_messages
from tests.support.runtimes import WorkerFactory, containers_of, no_containers

pytestmark = pytest.mark.integration


def request(image: str, *command: str, **extra: object) -> dict[str, object]:
    job_id = f"t-{uuid.uuid4().hex[:12]}"
    return {"job_id": job_id, "template": {"image": image, "command": list(command)}, **extra}


async def test_raw_amqp_job_runs_and_reports_exit_code_and_output(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    docker: aiodocker.Docker,
) -> None:
    req = request(test_image, "sh", "-c", "echo hi; exit 3")
    async with docker_worker(), client.events(job_id=str(req["job_id"])) as stream:
        reply = await raw_submit(settings.broker_url, json.dumps(req).encode())
        assert reply == {"status": "accepted", "job_id": req["job_id"], "errors": []}
        events = await until_terminal(stream, str(req["job_id"]))

    assert [e.phase for e in events] == [
        Phase.ACCEPTED,
        Phase.STARTING,
        Phase.RUNNING,
        Phase.FAILED,
    ]
    final = events[-1]
    assert final.exit_code == 3
    assert final.output is not None and "hi" in final.output
    assert final.sandbox_id and final.worker_id and final.host == settings.host
    await eventually(lambda: no_containers(docker, str(req["job_id"])))


async def test_successful_job_applies_limits_env_and_labels(
    client: Client, docker_worker: WorkerFactory, test_image: str, docker: aiodocker.Docker
) -> None:
    req = request(test_image, "sh", "-c", 'echo "$GREETING"; sleep 2')
    req["template"] = {**req["template"], "environment": {"GREETING": "hello"}}  # type: ignore[dict-item]
    req["resource_requirements"] = {"cpu": "500m", "memory": "64Mi"}
    req["labels"] = {"team": "ml"}
    job_id = str(req["job_id"])
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(req)).accepted
        running = await until_phase(stream, job_id, Phase.RUNNING)
        assert running.sandbox_id
        info = await docker.containers.container(running.sandbox_id).show()
        assert info["Name"] == f"/sandfleet-{job_id}"
        assert info["HostConfig"]["NanoCpus"] == 500_000_000
        assert info["HostConfig"]["Memory"] == 64 * 2**20
        assert info["Config"]["Labels"]["sandfleet.job_id"] == job_id
        assert info["Config"]["Labels"]["team"] == "ml"
        events = await until_terminal(stream, job_id)

    assert events[-1].phase is Phase.SUCCEEDED
    assert events[-1].exit_code == 0
    assert events[-1].output == "hello\n"


async def test_timeout_yields_timed_out_and_leaves_no_container(
    client: Client, docker_worker: WorkerFactory, test_image: str, docker: aiodocker.Docker
) -> None:
    req = request(test_image, "sh", "-c", "echo started; sleep 60")
    req["template"] = {**req["template"], "timeout_seconds": 1}  # type: ignore[dict-item]
    job_id = str(req["job_id"])
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(req)).accepted
        events = await until_terminal(stream, job_id)
        await eventually(lambda: no_containers(docker, job_id))

    assert [e.phase for e in events][-1] is Phase.TIMED_OUT
    assert events[-1].output is not None and "started" in events[-1].output


async def test_invalid_request_rejected_with_field_paths_and_dead_lettered(
    settings: Settings, client: Client, docker: aiodocker.Docker
) -> None:
    job_id = f"t-{uuid.uuid4().hex[:12]}"
    bad = {
        "job_id": job_id,
        "driver": "Kubernetes!",
        "resource_requirements": {"gpu": {"count": 0}},
        "template": {"image": "x", "driver_config": {"docker": ["not", "an", "object"]}},
    }
    async with client.events(job_id=job_id) as stream:
        reply = await raw_submit(settings.broker_url, json.dumps(bad).encode())
        events = await until_terminal(stream, job_id)

    assert reply["status"] == "rejected"
    assert reply["job_id"] == job_id
    fields = {e["field"] for e in reply["errors"]}  # type: ignore[attr-defined]
    assert fields == {"driver", "resource_requirements.gpu.count"}
    assert [e.phase for e in events] == [Phase.REJECTED]
    assert {e.field for e in events[0].errors} == fields
    assert not await containers_of(docker, job_id)
    assert [json.loads(b)["job_id"] for b in await dead_letters(settings.broker_url)] == [job_id]


async def test_bad_active_driver_block_rejected_by_gateway(
    settings: Settings, client: Client
) -> None:
    bad = request("img")
    bad["template"] = {"image": "img", "driver_config": {"docker": 7, "vm": "ignored"}}
    reply = await client.submit(bad)
    assert not reply.accepted
    assert [(e.field, e.message) for e in reply.errors] == [
        ("template.driver_config.docker", "must be a JSON object, not a number")
    ]


async def test_invalid_driver_block_rejected_by_worker_without_container(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    docker: aiodocker.Docker,
    test_image: str,
) -> None:
    req = request(test_image, "true")
    req["template"] = {
        **req["template"],  # type: ignore[dict-item]
        "driver_config": {"docker": {"gpu_device_ids": ["nvidia.com/gpu=all"], "shm": 1}},
    }
    job_id = str(req["job_id"])
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(req)).accepted  # the gateway never reads inside the block
        events = await until_terminal(stream, job_id)

    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.REJECTED]
    assert events[-1].reason == "InvalidDriverConfig"
    assert {e.field for e in events[-1].errors} == {
        "template.driver_config.docker.gpu_device_ids.0",
        "template.driver_config.docker.shm",
    }
    assert not await containers_of(docker, job_id)
    assert [json.loads(b)["job_id"] for b in await dead_letters(settings.broker_url)] == [job_id]


async def test_pinned_job_runs_only_on_its_host(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    req = request(test_image, "true", placement={"host": "hostb"})
    job_id = str(req["job_id"])
    async with (
        docker_worker(host="hosta", slots=2) as worker_a,
        docker_worker(host="hostb", slots=2) as worker_b,
        client.events(job_id=job_id) as stream,
    ):
        assert (await client.submit(req)).accepted
        events = await until_terminal(stream, job_id)

    worker_events = [e for e in events if e.phase is not Phase.ACCEPTED]
    assert [e.phase for e in worker_events] == [Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]
    assert {e.worker_id for e in worker_events} == {worker_b.identity.worker_id}
    assert {e.host for e in worker_events} == {"hostb"}
    assert worker_a.health().jobs_started == 0


async def test_job_for_unserved_host_or_driver_is_rejected_not_lost(
    settings: Settings, client: Client, docker_worker: WorkerFactory
) -> None:
    async with docker_worker():
        pinned = await client.submit(request("img", placement={"host": "nowhere"}))
        podman = await client.submit(request("img", driver="podman"))
    assert [(e.field, e.message) for e in pinned.errors] == [
        ("placement.host", "no docker worker serves host 'nowhere'")
    ]
    assert [(e.field, e.message) for e in podman.errors] == [
        ("driver", "no worker serves driver 'podman'")
    ]
    dead = [json.loads(b)["job_id"] for b in await dead_letters(settings.broker_url)]
    assert sorted(dead) == sorted([pinned.job_id, podman.job_id])


async def test_a_job_queue_deleted_after_its_route_was_checked_is_rejected_not_lost(
    settings: Settings, client: Client
) -> None:
    """The gateway remembers which job queues exist; one deleted since (an operator's
    act) returns the job's mandatory publish, and its job is rejected, not lost."""
    pinned = request("img", placement={"host": "gone"})
    async with await aio_pika.connect(settings.broker_url) as connection:
        channel = await connection.channel()
        await declare_job_queue(connection, channel, "docker", "gone")
        assert (await client.submit(pinned)).accepted  # its route is known from now on
        await channel.queue_delete(job_queue_name("docker", "gone"))
    reply = await client.submit(request("img", placement={"host": "gone"}))
    assert [(e.field, e.message) for e in reply.errors] == [
        ("placement.host", "no docker worker serves host 'gone'")
    ]
    async with client.events(job_id=reply.job_id, from_start=True) as stream:
        phases = [event.phase async for event in stream.history()]
    assert phases == [Phase.ACCEPTED, Phase.REJECTED]  # accepted, then returned


async def test_concurrent_jobs_for_missing_queues_are_each_rejected_at_once(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing queue closes the gateway's look-up channel; a look-up running beside
    it on that channel used to fail, and its job went back to the queue for another go."""
    drivers = ["podman", "vm", "nosuch"] * 8
    replies = await asyncio.gather(*(client.submit(request("img", driver=d)) for d in drivers))
    assert [r.errors[0].field for r in replies] == ["driver"] * len(drivers)
    assert "handler failed" not in caplog.text


async def test_garbage_is_dead_lettered_with_an_event_and_gateway_keeps_serving(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    garbage = b"\xff\xfe this is not JSON {"
    async with client.events(phases={Phase.REJECTED}) as stream:
        reply = await raw_submit(settings.broker_url, garbage)
        async with asyncio.timeout(15):
            event = await anext(aiter(stream))

    assert reply["status"] == "rejected"
    assert event.reason == "MalformedMessage"
    assert event.errors[0].field == "request"
    assert await dead_letters(settings.broker_url) == [garbage]

    req = request(test_image, "true")
    async with docker_worker(), client.events(job_id=str(req["job_id"])) as stream:
        assert (await client.submit(req)).accepted
        assert (await until_terminal(stream, str(req["job_id"])))[-1].phase is Phase.SUCCEEDED


async def test_missing_image_that_cannot_be_pulled_fails_clearly(
    client: Client, docker_worker: WorkerFactory, docker: aiodocker.Docker
) -> None:
    # A registry on a closed loopback port: the pull fails at once, without leaving the host.
    req = request("127.0.0.1:9/sandfleet/absent:1", "true")
    job_id = str(req["job_id"])
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(req)).accepted
        events = await until_terminal(stream, job_id)

    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.STARTING, Phase.FAILED]
    assert events[-1].reason == "ImageUnavailable"
    assert "127.0.0.1:9/sandfleet/absent:1" in events[-1].message
    assert not await containers_of(docker, job_id)


async def test_gpu_job_on_a_host_without_gpus_is_unschedulable(
    client: Client, docker_worker: WorkerFactory, docker: aiodocker.Docker, test_image: str
) -> None:
    req = request(test_image, "true", resource_requirements={"gpu": {"count": 1}})
    job_id = str(req["job_id"])
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(req)).accepted
        events = await until_terminal(stream, job_id)
    assert [e.phase for e in events] == [Phase.ACCEPTED, Phase.FAILED]
    assert events[-1].reason == "Unschedulable"
    assert "has 0" in events[-1].message
    assert not await containers_of(docker, job_id)


async def test_prefetch_equals_free_slots(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    """A one-slot worker with a job running leaves the next job in the queue for others."""
    first, second = request(test_image, "sleep", "3"), request(test_image, "true")
    async with (
        docker_worker(slots=1) as worker,
        client.events(job_id=str(first["job_id"])) as stream,
    ):
        assert (await client.submit(first)).accepted
        await until_phase(stream, str(first["job_id"]), Phase.RUNNING, timeout=15)
        assert (await client.submit(second)).accepted
        assert worker.health().free_slots == 0
        assert (
            await ready_messages(settings.broker_url, job_queue_name(worker.identity.driver)) == 1
        )


async def test_readers_skip_junk_in_the_event_log(settings: Settings, client: Client) -> None:
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.get_exchange("sandfleet.events")
        await events.publish(aio_pika.Message(b"not an event"), routing_key="running.docker.x")
    rejected = await client.submit({"job_id": "junk-after", "template": {}})
    assert not rejected.accepted
    history = await client.history("junk-after")
    assert [e.phase for e in history] == [Phase.REJECTED]
