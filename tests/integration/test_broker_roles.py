"""A black-box run with the accounts `sandfleet broker setup` makes: each role does its
work, and the broker itself refuses everything else it tries."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed

import sandfleet
from sandfleet.common.event_batches import EVENTS_TYPE, EventBatch
from sandfleet.common.events import Event, Phase
from sandfleet.common.job_logs import log_message
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CONTROL_EXCHANGE,
    CONTROL_LOG_QUEUE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    EVENTS_LOG_QUEUE,
    HEARTBEATS_LOG_QUEUE,
    JOBS_EXCHANGE,
    LOG_MARKER_KEY_PREFIX,
    LOGS_EXCHANGE,
    LOGS_LOG_QUEUE,
    QUERIES_EXCHANGE,
    SUBMISSIONS_EXCHANGE,
    SUBMIT_QUEUE,
    VIEW_QUEUE,
    job_queue_name,
)
from sandfleet.gateway.broker_setup import (
    DEFAULT_ADMIN_URL,
    CredentialsFile,
    FleetUsers,
    set_up_broker,
)
from sandfleet.gateway.service import Gateway
from tests.support import eventually, until_phase, until_terminal
from tests.support.broker import dead_letters, rabbitmqctl, vhost_of
from tests.support.cli import run_sandfleet, sandfleet_env
from tests.support.runtimes import registered_driver, worker_factory

pytestmark = pytest.mark.integration

ELSEWHERE = "elsewhere"


@dataclass
class Fleet:
    users: FleetUsers
    settings: Settings  # the worker's host is settings.host
    alice: str
    bob: str

    def request(self, *, run_seconds: float = 0, job_id: str | None = None) -> dict[str, Any]:
        return {
            "job_id": job_id or f"r-{uuid.uuid4().hex[:8]}",
            "driver": "inmemory",
            "template": {
                "image": "none",
                "command": ["echo", "hi"],
                "driver_config": {"inmemory": {"run_seconds": run_seconds}},
            },
        }


@pytest.fixture
async def fleet(make_settings: Callable[..., Settings], tmp_path: Path) -> AsyncIterator[Fleet]:
    """A gateway and an in-memory worker, each on its own role's account."""
    settings = make_settings()
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    users = await set_up_broker(
        settings,
        admin_url=DEFAULT_ADMIN_URL,
        credentials=CredentialsFile(tmp_path / "broker-users.json"),
        hosts=[settings.host, ELSEWHERE],
        submitters=[alice, bob],
        drivers=["inmemory"],
    )
    on = settings.model_copy
    try:
        async with Gateway(on(update={"broker_url": users.gateway})):
            start = worker_factory(
                on(update={"broker_url": users.workers[settings.host]}),
                registered_driver("inmemory"),
            )
            async with start(slots=4):
                yield Fleet(users=users, settings=settings, alice=alice, bob=bob)
    finally:
        for user in (alice, bob):
            await asyncio.to_thread(rabbitmqctl, "delete_user", user)


Operation = Callable[[AbstractChannel], Awaitable[object]]


async def refused(url: str, operation: Operation) -> str:
    """What the broker says when the account at `url` tries `operation`."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises((ChannelAccessRefused, ChannelPreconditionFailed)) as caught:
            await operation(channel)
    return str(caught.value)


def publish(exchange: str, key: str, body: bytes = b"{}", **properties: Any) -> Operation:
    async def run(channel: AbstractChannel) -> None:
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        await target.publish(aio_pika.Message(body, **properties), routing_key=key)

    return run


def consume(queue: str) -> Operation:
    async def ignore(message: AbstractIncomingMessage) -> None:
        pass

    async def run(channel: AbstractChannel) -> None:
        await channel.set_qos(prefetch_count=1)
        found = await channel.declare_queue(queue, passive=True)
        await found.consume(ignore)

    return run


def declare(queue: str) -> Operation:
    return lambda channel: channel.declare_queue(queue, durable=True)


def delete(queue: str) -> Operation:
    async def run(channel: AbstractChannel) -> None:
        await (await channel.declare_queue(queue, passive=True)).delete(if_unused=False)

    return run


def purge(queue: str) -> Operation:
    async def run(channel: AbstractChannel) -> None:
        await (await channel.declare_queue(queue, passive=True)).purge()

    return run


async def test_submitters_own_their_job_ids_and_admins_may_cancel_anything(
    fleet: Fleet,
) -> None:
    users = fleet.users
    async with (
        sandfleet.Client(users.submitters[fleet.alice]) as alice,
        sandfleet.Client(users.submitters[fleet.bob]) as bob,
        sandfleet.Client(users.admin) as admin,
    ):
        done = await alice.run(fleet.request(), timeout=60)
        assert done.phase is Phase.SUCCEEDED
        history = await alice.history(done.job_id or "")
        assert {e.submitted_by for e in history} == {fleet.alice}

        long = fleet.request(run_seconds=120)
        async with alice.events(job_id=long["job_id"]) as stream:
            assert (await alice.submit(long)).accepted
            await until_phase(stream, long["job_id"], Phase.RUNNING)
            # bob can neither cancel it, nor take its id, nor end it with a bad request
            with pytest.raises(sandfleet.CancelRefused, match="belongs to another submitter"):
                await bob.cancel(long["job_id"])
            taken = await bob.submit(fleet.request(job_id=long["job_id"]))
            broken = {**fleet.request(job_id=long["job_id"]), "template": {"image": ""}}
            invalid = await bob.submit(broken)
            with pytest.raises(sandfleet.CancelRefused, match="no job 'never-submitted'"):
                await bob.cancel("never-submitted")
            await alice.cancel(long["job_id"])
            ended = await until_terminal(stream, long["job_id"])

        other = fleet.request(run_seconds=120)
        assert (await alice.submit(other)).accepted
        await admin.cancel(other["job_id"])  # an admin may cancel anyone's job
        by_admin = await alice.wait(other["job_id"], timeout=60)

    assert not taken.accepted and taken.job_id != long["job_id"]
    assert [e.field for e in taken.errors] == ["job_id"]
    assert not invalid.accepted and invalid.job_id != long["job_id"]
    assert [e.phase for e in ended] == [Phase.CANCELLED]  # nothing of bob's in between
    assert (by_admin.phase, by_admin.submitted_by) == (Phase.CANCELLED, fleet.alice)


async def test_a_submitter_account_is_refused_everything_but_submitting_and_reading(
    fleet: Fleet,
) -> None:
    url, host = fleet.users.submitters[fleet.alice], fleet.settings.host
    shared = job_queue_name("inmemory")
    attempts = {
        "jobs exchange": publish(JOBS_EXCHANGE, "inmemory"),
        "job queue": consume(shared),
        "event": publish(EVENTS_EXCHANGE, f"succeeded.inmemory.{host}"),
        "control": publish(CONTROL_EXCHANGE, ""),
        "default exchange": publish("", shared),
        "declare": declare("mine"),
        "delete": delete(shared),
        "purge": purge(SUBMIT_QUEUE),
        "impersonate": publish(SUBMISSIONS_EXCHANGE, "", user_id=fleet.bob),
    }
    said = {name: await refused(url, attempt) for name, attempt in attempts.items()}
    assert all("ACCESS_REFUSED" in text for name, text in said.items() if name != "impersonate")
    assert "user_id property set to" in said["impersonate"]
    assert "topic 'succeeded.inmemory" in said["event"]


def bind(queue: str, exchange: str, key: str) -> Operation:
    async def run(channel: AbstractChannel) -> None:
        await (await channel.declare_queue(queue, passive=True)).bind(exchange, routing_key=key)

    return run


async def test_a_worker_account_is_confined_to_its_host(fleet: Fleet) -> None:
    url, host = fleet.users.workers[fleet.settings.host], fleet.settings.host
    own = job_queue_name("inmemory", host)
    attempts = {
        # bound to another host's key, its own queue would receive that host's jobs
        "binding its queue to another host": bind(own, JOBS_EXCHANGE, f"inmemory.{ELSEWHERE}"),
        "declaring even its own queue": declare(own),
        "publishing accepted": publish(EVENTS_EXCHANGE, f"accepted.inmemory.{host}"),
        "another host's queue": consume(job_queue_name("inmemory", ELSEWHERE)),
        "another host's events": publish(EVENTS_EXCHANGE, f"succeeded.inmemory.{ELSEWHERE}"),
        "the shared queue's declaration": declare(job_queue_name("inmemory")),
        "deleting the shared queue": delete(job_queue_name("inmemory")),
        "submissions": publish(SUBMISSIONS_EXCHANGE, ""),
        "the gateway's queue": consume(SUBMIT_QUEUE),
        "the event log": consume(EVENTS_LOG_QUEUE),
        "the default exchange": publish("", job_queue_name("inmemory", ELSEWHERE)),
    }
    said = {name: await refused(url, attempt) for name, attempt in attempts.items()}
    assert all("ACCESS_REFUSED" in text for text in said.values()), said


async def test_the_gateway_replies_only_to_reply_queues(fleet: Fleet) -> None:
    """A reply_to naming a queue (here the dead-letter queue) would have the gateway
    write there by amq.default for the submitter; it answers only reply queues."""
    request = fleet.request()
    url = fleet.users.submitters[fleet.alice]
    body = json.dumps(request).encode()
    send = publish(SUBMISSIONS_EXCHANGE, "", body, user_id=fleet.alice, reply_to=DEAD_QUEUE)
    async with sandfleet.Client(url) as alice, alice.events(job_id=request["job_id"]) as stream:
        await refused_or_sent(url, send)
        [*_, done] = await until_terminal(stream, request["job_id"])
    assert done.phase is Phase.SUCCEEDED
    assert await dead_letters(fleet.users.admin) == []


async def refused_or_sent(url: str, operation: Operation) -> None:
    connection = await aio_pika.connect(url)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        await operation(channel)


async def test_an_event_under_another_hosts_key_is_not_believed(fleet: Fleet) -> None:
    """A worker may publish only its own host's keys; one that puts another host in the
    event's body is skipped by every reader (the key and the body disagree)."""
    host = fleet.settings.host
    forged = Event(job_id="victim", phase=Phase.SUCCEEDED, driver="inmemory", host=ELSEWHERE)
    connection = await aio_pika.connect(fleet.users.workers[host])
    async with connection, connection.channel(publisher_confirms=True) as channel:
        events = await channel.get_exchange(EVENTS_EXCHANGE)
        body = forged.model_dump_json().encode()
        await events.publish(aio_pika.Message(body), routing_key=f"succeeded.inmemory.{host}")
    async with sandfleet.Client(fleet.users.observer) as observer:
        assert await observer.history("victim") == []


async def test_an_event_batch_cannot_carry_another_hosts_event(fleet: Fleet) -> None:
    """Packed with an event of its own host, under its own key (common.event_batches),
    another host's event is skipped alone: readers check each event of a batch."""
    host = fleet.settings.host
    mine = Event(job_id=f"own-{uuid.uuid4().hex[:6]}", phase=Phase.SUCCEEDED, driver="inmemory",
                 host=host)  # fmt: skip
    forged = Event(job_id="batch-victim", phase=Phase.SUCCEEDED, driver="inmemory", host=ELSEWHERE)
    body = EventBatch(events=[mine, forged]).model_dump_json().encode()
    connection = await aio_pika.connect(fleet.users.workers[host])
    async with connection, connection.channel(publisher_confirms=True) as channel:
        events = await channel.get_exchange(EVENTS_EXCHANGE)
        batch = aio_pika.Message(body, type=EVENTS_TYPE)
        await events.publish(batch, routing_key=f"succeeded.inmemory.{host}")
    async with sandfleet.Client(fleet.users.observer) as observer:
        assert await observer.history("batch-victim") == []
        assert [event.event_id for event in await observer.history(mine.job_id or "")] == [
            mine.event_id
        ]


async def test_the_observer_only_reads(fleet: Fleet) -> None:
    url = fleet.users.observer
    async with sandfleet.Client(fleet.users.submitters[fleet.alice]) as alice:
        done = await alice.run(fleet.request(), timeout=60)
    async with sandfleet.Client(url) as observer:
        assert (await observer.history(done.job_id or ""))[-1] == done
    for attempt in (
        publish(SUBMISSIONS_EXCHANGE, ""),
        publish(EVENTS_EXCHANGE, f"succeeded.inmemory.{fleet.settings.host}"),
        consume(job_queue_name("inmemory")),
    ):
        assert "ACCESS_REFUSED" in await refused(url, attempt)


async def test_top_needs_only_the_observer_account(fleet: Fleet) -> None:
    async with (
        sandfleet.Client(fleet.users.submitters[fleet.alice]) as alice,
        alice.events() as stream,
    ):
        job_id = (await alice.submit(fleet.request(run_seconds=60))).job_id
        await until_phase(stream, job_id, Phase.RUNNING)
        env = sandfleet_env(fleet.settings, SANDFLEET_BROKER_URL=fleet.users.observer)
        ran = await run_sandfleet(env, "top", "--once", "--json")
        await alice.cancel(job_id)
    assert ran.returncode == 0, ran.stderr
    [snapshot] = ran.json_lines
    assert [(j["job_id"], j["phase"]) for j in snapshot["jobs"]] == [(job_id, "running")]
    assert [h["host"] for h in snapshot["hosts"]] == [fleet.settings.host]


async def test_every_log_the_fleet_keeps_is_bounded(fleet: Fleet) -> None:
    """The event and control logs (streams) have a size cap and an age; the submit and
    job queues a delivery limit: no submitter can grow the broker's disk without end.
    The limits are broker setup's policies (tests/integration/test_queue_policies.py
    shows their definitions in force)."""
    vhost = vhost_of(fleet.settings.broker_url)
    listed = await asyncio.to_thread(
        rabbitmqctl, "list_queues", "-p", vhost, "name", "policy", "arguments"
    )
    found = dict(line.split("\t", 1) for line in listed.strip().splitlines()[1:])
    policies = {
        EVENTS_LOG_QUEUE: "sandfleet-events-log",
        HEARTBEATS_LOG_QUEUE: "sandfleet-heartbeats-log",
        CONTROL_LOG_QUEUE: "sandfleet-control-log",
        LOGS_LOG_QUEUE: "sandfleet-logs-log",
        SUBMIT_QUEUE: "sandfleet-intake",
        job_queue_name("inmemory"): "sandfleet-intake",
        DEAD_QUEUE: "sandfleet-dead",
        VIEW_QUEUE: "sandfleet-view",
    }
    for queue, policy in policies.items():
        assert found[queue].startswith(f"{policy}\t"), (queue, found[queue])
    assert "x-message-ttl" in found[VIEW_QUEUE]


async def test_submitters_and_observers_may_ask_the_job_view_but_not_take_its_questions(
    fleet: Fleet,
) -> None:
    """Every submitter reads the whole event log already, so each may list every job;
    only the gateways consume sandfleet.view: nobody reads another's questions, or
    answers them in a gateway's place."""
    users = fleet.users
    async with sandfleet.Client(users.submitters[fleet.alice]) as alice:
        done = await alice.run(fleet.request(), timeout=60)

        async def ended() -> bool:
            job = (await alice.status(done.job_id or "")).job
            return job is not None and job.phase is Phase.SUCCEEDED

        await eventually(ended, timeout=30)
    async with sandfleet.Client(users.observer) as observer:
        listed = (await observer.jobs(submitted_by=fleet.alice)).jobs or []
    assert [job.job_id for job in listed] == [done.job_id]
    asker_urls = (users.submitters[fleet.bob], users.observer)
    for url in asker_urls:
        for attempt in (consume(VIEW_QUEUE), purge(VIEW_QUEUE), delete(VIEW_QUEUE)):
            assert "ACCESS_REFUSED" in await refused(url, attempt)
    worker_url = users.workers[fleet.settings.host]
    assert "ACCESS_REFUSED" in await refused(worker_url, publish(QUERIES_EXCHANGE, ""))


async def test_job_logs_are_written_by_the_jobs_worker_alone_and_read_by_submitters(
    fleet: Fleet,
) -> None:
    host, alice_url = fleet.settings.host, fleet.users.submitters[fleet.alice]
    request = fleet.request()
    request["template"]["driver_config"]["inmemory"]["output"] = "hello\nworld\n"
    # Under a marker's key (which the broker lets any reader write) and first in the
    # stream, dressed as the job's first chunk: readers must not believe it.
    forged = log_message(request["job_id"], 0, b"forged\n")
    connection = await aio_pika.connect(alice_url)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        logs = await channel.get_exchange(LOGS_EXCHANGE)
        await logs.publish(forged, routing_key=f"{LOG_MARKER_KEY_PREFIX}{uuid.uuid4().hex}")
    async with sandfleet.Client(alice_url) as alice:
        assert (await alice.run(request, timeout=60)).phase is Phase.SUCCEEDED
        by_alice = [line async for line in alice.logs(request["job_id"])]
    async with sandfleet.Client(fleet.users.observer) as observer:
        by_observer = [line async for line in observer.logs(request["job_id"], tail=1)]
    assert (by_alice, by_observer) == (["hello", "world"], ["world"])
    attempts = {
        "a worker, another host's key": (
            fleet.users.workers[host],
            publish(LOGS_EXCHANGE, f"inmemory.{ELSEWHERE}"),
        ),
        "a submitter, a worker's key": (alice_url, publish(LOGS_EXCHANGE, f"inmemory.{host}")),
        "an observer, a worker's key": (
            fleet.users.observer,
            publish(LOGS_EXCHANGE, f"inmemory.{host}"),
        ),
        "a worker reading the logs": (fleet.users.workers[host], consume(LOGS_LOG_QUEUE)),
    }
    said = {name: await refused(url, attempt) for name, (url, attempt) in attempts.items()}
    assert all("ACCESS_REFUSED" in text for text in said.values()), said
