"""Only jobs and cancellations the gateway signed count: a forged one never runs, and
never touches the job whose id it claims."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sandfleet_inmemory.driver import InMemoryDriver

from sandfleet.common.events import Event, Phase
from sandfleet.common.models import CancelRequest, Job, JobTemplate, Placement
from sandfleet.common.settings import Settings
from sandfleet.common.signing import JobSigner, SignatureVerifier, signed
from sandfleet.common.topology import CONTROL_EXCHANGE, JOBS_EXCHANGE
from sandfleet.gateway.client import Client
from sandfleet.gateway.events_stream import EventStream
from sandfleet.gateway.service import Gateway
from sandfleet.workers.job_signatures import BAD_SIGNATURE, WRONG_HOST, UnsignedJobsRefused
from sandfleet.workers.runtime import Worker
from tests.support import until_phase, until_terminal
from tests.support.broker import dead_letters
from tests.support.job_queues import job_queue
from tests.support.runtimes import registered_driver, worker_factory

pytestmark = pytest.mark.integration


def a_job(job_id: str, **block: Any) -> Job:
    return Job(
        job_id=job_id,
        driver="inmemory",
        submitted_by="someone",
        template=JobTemplate(image="none", command=["echo", "forged"], driver_config=block),
    )


def tampered(job: Job, signing_key: Path) -> Job:
    """Signed by the fleet's own key, then changed."""
    good = signed(job, JobSigner.from_file(signing_key))
    return good.model_copy(update={"template": JobTemplate(image="none", command=["evil"])})


async def next_refusal(stream: EventStream) -> Event:
    """The next `rejected` event that names no job: a worker's refusal of a message."""
    async with asyncio.timeout(30):
        async for event in stream:
            if event.phase is Phase.REJECTED and event.job_id is None:
                return event
    raise AssertionError("the event stream ended")


async def publish_job(url: str, job: Job) -> None:
    """Straight onto the driver's queue, as anyone allowed to write there could."""
    connection = await aio_pika.connect(url)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        jobs = await channel.get_exchange(JOBS_EXCHANGE)
        body = job.model_dump_json().encode()
        await jobs.publish(aio_pika.Message(body, message_id=job.job_id), routing_key="inmemory")


async def test_a_job_the_gateway_did_not_sign_never_runs(
    settings: Settings, client: Client
) -> None:
    driver = InMemoryDriver()
    stranger = JobSigner(Ed25519PrivateKey.generate())
    assert settings.signing_key is not None
    forged = {
        "unsigned": a_job(f"f-{uuid.uuid4().hex[:6]}"),
        "untrusted key": signed(a_job(f"f-{uuid.uuid4().hex[:6]}"), stranger),
        "changed after signing": tampered(a_job(f"f-{uuid.uuid4().hex[:6]}"), settings.signing_key),
    }
    async with worker_factory(settings, lambda s: driver)(), client.events() as stream:
        for job in forged.values():
            await publish_job(settings.broker_url, job)
        refusals = [await next_refusal(stream) for _ in forged]
        # and a signed job still runs (through the gateway)
        ok = await client.run(
            {"driver": "inmemory", "template": {"image": "none", "command": ["true"]}}, timeout=60
        )
    assert ok.phase is Phase.SUCCEEDED
    assert {e.reason for e in refusals} == {BAD_SIGNATURE}
    assert all(e.job_id is None for e in refusals)  # no forged id is spoken for
    messages = " ".join(e.message for e in refusals)
    assert "not signed" in messages and "not trusted" in messages and "does not match" in messages
    created = {name for operation, name in driver.calls if operation == "create"}
    assert not any(job.job_id in name for job in forged.values() for name in created)
    dead = {json.loads(body)["job_id"] for body in await dead_letters(settings.broker_url)}
    assert {job.job_id for job in forged.values()} <= dead
    for job in forged.values():
        assert await client.history(job.job_id) == []


async def test_a_forged_cancellation_is_ignored(settings: Settings, client: Client) -> None:
    start = worker_factory(settings, registered_driver("inmemory"))
    job_id = f"c-{uuid.uuid4().hex[:6]}"
    request = {
        "job_id": job_id,
        "driver": "inmemory",
        "template": {
            "image": "none",
            "command": ["true"],
            "driver_config": {"inmemory": {"run_seconds": 2}},
        },
    }
    async with start(), client.events(job_id=job_id) as stream:
        assert (await client.submit(request)).accepted
        await until_phase(stream, job_id, Phase.RUNNING)
        stranger = JobSigner(Ed25519PrivateKey.generate())
        connection = await aio_pika.connect(settings.broker_url)
        async with connection, connection.channel(publisher_confirms=True) as channel:
            control = await channel.get_exchange(CONTROL_EXCHANGE)
            for cancel in (
                CancelRequest(job_id=job_id),
                signed(CancelRequest(job_id=job_id), stranger),
            ):
                await control.publish(
                    aio_pika.Message(cancel.model_dump_json().encode()), routing_key=""
                )
        [ended] = await until_terminal(stream, job_id)
    assert ended.phase is Phase.SUCCEEDED


def test_a_worker_with_no_trusted_keys_refuses_to_start(
    make_settings: Callable[..., Settings],
) -> None:
    driver = registered_driver("inmemory")
    with pytest.raises(UnsignedJobsRefused, match="SANDFLEET_TRUSTED_KEYS"):
        Worker(make_settings(trusted_keys=""), driver(make_settings()))
    with pytest.raises(UnsignedJobsRefused, match="no such file"):
        Worker(make_settings(trusted_keys="/nonexistent.pub"), driver(make_settings()))
    allowed = make_settings(trusted_keys="", allow_unsigned_jobs=True)
    Worker(allowed, driver(allowed))  # explicitly allowed


async def test_with_unsigned_jobs_allowed_an_unsigning_gateway_still_works(
    make_settings: Callable[..., Settings],
) -> None:
    """The single-machine mode: no keys anywhere, said out loud."""
    settings = make_settings(signing_key=None, trusted_keys="", allow_unsigned_jobs=True)
    start = worker_factory(settings, registered_driver("inmemory"))
    async with Gateway(settings), start(), Client(settings.broker_url) as client:
        outcome = await client.run(
            {"driver": "inmemory", "template": {"image": "none", "command": ["true"]}}, timeout=60
        )
    assert outcome.phase is Phase.SUCCEEDED


async def test_a_signed_job_placed_on_another_host_never_runs_here(
    settings: Settings, client: Client
) -> None:
    """A copy of a real job re-published into this host's queue (by a compromised peer)
    is refused without a word under the job's id: the job runs where it was placed."""
    assert settings.signing_key is not None
    driver = InMemoryDriver()
    job = a_job(f"p-{uuid.uuid4().hex[:6]}").model_copy(
        update={"placement": Placement(host="elsewhere")}
    )
    copy = signed(job, JobSigner.from_file(settings.signing_key))
    async with worker_factory(settings, lambda s: driver)(), client.events() as stream:
        await publish_job(settings.broker_url, copy)
        refusal = await next_refusal(stream)
    assert refusal.reason == WRONG_HOST and "elsewhere" in refusal.message
    assert not any(operation == "create" for operation, _ in driver.calls)
    assert await client.history(job.job_id) == []


async def read_and_return(url: str, queue_name: str) -> list[bytes]:
    """The bodies of the messages in a queue, left there (requeued unacked)."""
    bodies: list[bytes] = []
    connection = await aio_pika.connect(url)
    async with connection:
        queue = await (await connection.channel()).get_queue(queue_name)
        while (message := await queue.get(fail=False)) is not None:
            bodies.append(message.body)
    return bodies


async def test_a_batchs_jobs_share_one_signature_and_each_runs_on_its_own_proof(
    settings: Settings, client: Client
) -> None:
    """Jobs admitted together are signed under one signature over a tree of them: each on
    the queue carries its own proof and runs; a copy changed on the way, its proof kept,
    is refused as any forged job is."""
    queue_name = await job_queue(settings.broker_url, "inmemory")
    ids = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    replies = await client.submit_many(
        {"job_id": i, "driver": "inmemory", "template": {"image": "none", "command": ["true"]}}
        for i in ids
    )
    assert all(reply.accepted for reply in replies)
    queued = {
        json.loads(body)["job_id"]: body
        for body in await read_and_return(settings.broker_url, queue_name)
    }
    assert set(queued) == set(ids)
    signatures = [json.loads(body)["signature"] for body in queued.values()]
    # Admitted in one pass (the batch's `accepted` events read back together), they share
    # a signature; each that does carries its own proof and salt.
    shared = Counter(s["value"] for s in signatures)
    assert max(shared.values()) >= 2
    assert all(s["proof"] and s["salt"] for s in signatures if shared[s["value"]] > 1)
    assert settings.trusted_keys
    verifier = SignatureVerifier.from_files([Path(settings.trusted_keys)])
    for body in queued.values():
        verifier.verify(json.loads(body))
    changed = json.loads(queued[ids[0]])
    changed["job_id"], changed["template"]["command"] = f"x-{ids[0]}", ["evil"]
    driver = InMemoryDriver()
    # The stream first: the worker runs what is queued as soon as it starts.
    async with client.events() as stream, worker_factory(settings, lambda s: driver)():
        await publish_job(settings.broker_url, Job.model_validate_json(json.dumps(changed)))
        ended: dict[str, Phase] = {}
        refusal: Event | None = None
        async with asyncio.timeout(60):
            async for event in stream:
                if event.phase is Phase.REJECTED and event.job_id is None:
                    refusal = event
                elif event.job_id in ids and event.phase.is_terminal:
                    ended[event.job_id] = event.phase
                if len(ended) == len(ids) and refusal is not None:
                    break
    assert refusal is not None and refusal.reason == BAD_SIGNATURE
    assert "does not match" in refusal.message
    assert ended == dict.fromkeys(ids, Phase.SUCCEEDED)
    assert not any(changed["job_id"] in name for _, name in driver.calls)
