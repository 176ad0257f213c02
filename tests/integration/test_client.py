"""sandfleet.Client and sandfleet.SyncClient against a real broker, gateway and Docker
worker: what a submitter may do with the fewest RabbitMQ permissions, and how wait and
run find a job's outcome."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

import sandfleet
from sandfleet.common import broker_roles as roles
from sandfleet.common.event_publisher import EventPublisher
from sandfleet.common.events import Event
from sandfleet.common.models import SandboxRequest
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CONTROL_EXCHANGE,
    EVENTS_EXCHANGE,
    EVENTS_LOG_QUEUE,
    SUBMIT_QUEUE,
)
from sandfleet.gateway.gateway_requests import DIRECT_REPLY_TO
from sandfleet.gateway.service import Gateway
from tests.support import eventually, until_phase, until_terminal
from tests.support.broker import rabbitmqctl, vhost_of, vhost_user
from tests.support.runtimes import WorkerFactory

pytestmark = pytest.mark.integration

Phase = sandfleet.Phase


def job(image: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": f"c-{uuid.uuid4().hex[:10]}",
        "template": {"image": image, "command": ["sh", "-c", script]},
        **extra,
    }


def reserved_label(image: str) -> dict[str, Any]:
    """A request the gateway rejects (label keys starting `sandfleet.` are reserved)."""
    return job(image, "true", labels={"sandfleet.mine": "x"})


@pytest.fixture
def submitter_url(broker_url: str) -> Iterator[str]:
    # What a submitter needs, as `sandfleet broker setup` grants it: publishing to
    # sandfleet.submissions (submissions, cancellations) and log markers to
    # sandfleet.events, and consuming the event log. Nothing to configure.
    with vhost_user(broker_url, roles.submitter()) as url:
        yield url


async def test_a_submitter_needs_no_configure_permission(
    submitter_url: str, gateway: Gateway, docker_worker: WorkerFactory, test_image: str
) -> None:
    async with docker_worker(slots=2), sandfleet.Client(submitter_url) as client:
        outcome = await client.run(job(test_image, "echo hi"), timeout=60)
        with pytest.raises(sandfleet.SubmissionRejected):
            await client.run(reserved_label(test_image), timeout=60)
        long = job(test_image, "sleep 60")
        assert (await client.submit(long)).accepted
        async with client.events(job_id=long["job_id"], from_start=True) as stream:
            await until_phase(stream, long["job_id"], Phase.RUNNING)
        await client.cancel(long["job_id"])
        cancelled = await client.wait(long["job_id"], timeout=60)
        history = await client.history(long["job_id"])
        synced = await asyncio.to_thread(submit_through_sync_client, submitter_url, test_image)
    assert (outcome.phase, outcome.output) == (Phase.SUCCEEDED, "hi\n")
    assert cancelled.phase is Phase.CANCELLED
    assert history[0].phase is Phase.ACCEPTED and history[-1] == cancelled
    assert synced == [Phase.SUCCEEDED, Phase.CANCELLED, Phase.CANCELLED]


def submit_through_sync_client(url: str, image: str) -> list[sandfleet.Phase]:
    with sandfleet.SyncClient(url) as client:
        outcome = client.run(job(image, "true"), timeout=60)
        long = job(image, "sleep 60")
        assert client.submit(long).accepted
        with client.events(job_id=long["job_id"], from_start=True) as stream:
            next(e for e in stream if e.phase is Phase.RUNNING)
        client.cancel(long["job_id"])
        cancelled = client.wait(long["job_id"], timeout=60)
        return [outcome.phase, cancelled.phase, client.history(long["job_id"])[-1].phase]


async def test_an_observer_reads_the_log_and_writes_only_markers(
    broker_url: str, client: sandfleet.Client, test_image: str
) -> None:
    """Reading history also writes a marker into the log, through sandfleet.events under
    a `log-marker.*` key: all an observer may write."""
    rejected = reserved_label(test_image)
    assert not (await client.submit(rejected)).accepted
    with vhost_user(broker_url, roles.observer()) as url:
        async with sandfleet.Client(url) as watcher:
            history = await watcher.history(rejected["job_id"])
            outcome = await watcher.wait(rejected["job_id"], timeout=30)
            with pytest.raises(ChannelAccessRefused, match=r"sandfleet\.submissions"):
                await watcher.cancel(rejected["job_id"])  # only submitters ask the gateway
    assert [e.phase for e in history] == [Phase.REJECTED] and outcome == history[0]


async def test_passive_lookups_need_no_permission_and_declaring_needs_configure(
    submitter_url: str, gateway: Gateway
) -> None:
    """Why the client may look queues up passively: RabbitMQ 3.10 checks no permission
    for a passive declare, while a real declare of the same queue needs configure."""
    connection = await aio_pika.connect(submitter_url)
    async with connection:
        channel = await connection.channel()
        for queue in (EVENTS_LOG_QUEUE, SUBMIT_QUEUE, DIRECT_REPLY_TO):
            await channel.declare_queue(queue, passive=True)
        await channel.get_exchange(CONTROL_EXCHANGE, ensure=True)
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_queue(
                EVENTS_LOG_QUEUE, durable=True, arguments={"x-queue-type": "stream"}
            )


async def test_the_client_declares_nothing(broker_url: str) -> None:
    """On a broker no gateway has set up, the client says so and leaves it untouched."""
    async with sandfleet.Client(broker_url) as client:
        with pytest.raises(sandfleet.FleetUnreachable, match="no gateway has run here"):
            await client.submit({"template": {"image": "x"}})
        with pytest.raises(sandfleet.FleetUnreachable, match="no event log"):
            await client.history("any")
        with pytest.raises(sandfleet.FleetUnreachable, match="no gateway has run here"):
            await client.cancel("any")
        with pytest.raises(sandfleet.FleetUnreachable, match="no gateway has run here"):
            await client.status("any")
    queues = await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", vhost_of(broker_url))
    exchanges = await asyncio.to_thread(
        rabbitmqctl, "list_exchanges", "-p", vhost_of(broker_url), "name"
    )
    assert "sandfleet" not in queues and "sandfleet" not in exchanges


async def test_wait_returns_an_ended_jobs_outcome_or_follows_a_running_one(
    client: sandfleet.Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    async with docker_worker(slots=2):
        ended = await client.run(job(test_image, "exit 5"), timeout=60)
        running = job(test_image, "sleep 1; echo done")
        assert (await client.submit(running)).accepted
        waited_running = await client.wait(running["job_id"], timeout=60)
        waited_ended = await client.wait(ended.job_id or "", timeout=60)
    assert waited_ended == ended and ended.phase is Phase.FAILED and ended.exit_code == 5
    assert (waited_running.phase, waited_running.output) == (Phase.SUCCEEDED, "done\n")


async def test_wait_for_an_unknown_job_raises_job_not_found(client: sandfleet.Client) -> None:
    with pytest.raises(sandfleet.JobNotFound) as raised:
        await client.wait("never-submitted", timeout=30)
    assert raised.value.job_id == "never-submitted"


async def test_wait_and_run_time_out(
    client: sandfleet.Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    long, longer = job(test_image, "sleep 60"), job(test_image, "sleep 60")
    async with docker_worker(slots=2), client.events() as stream:
        with pytest.raises(TimeoutError):
            await client.run(long, timeout=1)
        assert (await client.submit(longer)).accepted
        with pytest.raises(TimeoutError):
            await client.wait(longer["job_id"], timeout=0.5)
        for request in (long, longer):
            await client.cancel(request["job_id"])
            await until_terminal(stream, request["job_id"])


async def test_a_timeout_at_any_moment_leaves_the_client_usable(
    client: sandfleet.Client, test_image: str
) -> None:
    """A deadline can fall while `run` opens or closes its event stream's channel.
    Cutting a channel RPC short used to make the broker close the whole connection
    (504 "expected 'channel.open'"), so the next request failed with FleetUnreachable."""
    for step in range(120):
        with suppress(TimeoutError, sandfleet.SubmissionRejected):  # no worker: rejected
            await client.run(reserved_label(test_image), timeout=(step % 40) * 0.0005)
        assert not (await client.submit(reserved_label(test_image))).accepted


async def test_a_rejected_id_submitted_again_is_waited_for_anew(
    client: sandfleet.Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    rejected = reserved_label(test_image)
    job_id = rejected["job_id"]
    async with docker_worker():
        assert not (await client.submit(rejected)).accepted
        assert (await client.wait(job_id, timeout=30)).phase is Phase.REJECTED
        again = {
            **rejected,
            "labels": {},
            "template": {**rejected["template"], "command": ["sleep", "1"]},
        }
        assert (await client.submit(again)).accepted
        outcome = await client.wait(job_id, timeout=60)
    assert outcome.phase is Phase.SUCCEEDED


async def test_run_raises_submission_rejected_with_every_field_error(
    client: sandfleet.Client, test_image: str
) -> None:
    request = reserved_label(test_image)
    request["resource_requirements"] = {"gpu": {"count": 0}}
    with pytest.raises(sandfleet.SubmissionRejected) as raised:
        await client.run(request, timeout=30)
    assert raised.value.job_id == request["job_id"]
    fields = sorted(error.field for error in raised.value.errors)
    assert fields == ["labels", "resource_requirements.gpu.count"]
    assert all(error.message for error in raised.value.errors)


async def test_run_of_a_job_id_already_in_the_fleet_returns_its_outcome(
    client: sandfleet.Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    request = job(test_image, "echo once")
    async with docker_worker():
        first = await client.run(request, timeout=60)
        again = await client.run(request, timeout=60)
        history = await client.history(request["job_id"])
    assert again == first and first.output == "once\n"
    assert [e.phase for e in history].count(Phase.ACCEPTED) == 1


async def test_start_gives_the_reply_then_the_jobs_events(
    client: sandfleet.Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    async with docker_worker(), client.start(job(test_image, "true")) as started:
        assert started.reply.accepted and not started.reply.duplicate
        phases = [event.phase async for event in started]
    assert phases == [Phase.ACCEPTED, Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED]


async def test_submit_takes_a_model_a_dict_or_json_bytes(
    client: sandfleet.Client, test_image: str
) -> None:
    # No worker serves the driver: each is answered (rejected as unroutable), which is
    # all this checks, that each form reaches the gateway whole.
    as_dict = job(test_image, "true")
    model = SandboxRequest.model_validate(job(test_image, "true"))
    as_bytes = SandboxRequest.model_validate(job(test_image, "true")).model_dump_json().encode()
    for request in (as_dict, model, as_bytes):
        reply = await client.submit(request)
        assert [str(e) for e in reply.errors] == ["driver: no worker serves driver 'docker'"]


async def test_the_reply_consumer_comes_back_after_a_reconnect(
    client: sandfleet.Client, broker_url: str
) -> None:
    """Direct reply-to needs a consumer on the channel that publishes; the robust channel
    must restore it when the broker drops the connection."""
    assert (await client.submit({"template": {"image": "x"}})).status == "rejected"
    closed = await asyncio.to_thread(close_client_connections, vhost_of(broker_url))
    assert closed == 1

    async def answered() -> bool:
        try:
            await client.submit({"template": {"image": "x"}}, timeout=2)
        except ConnectionError:  # FleetUnreachable (no reply yet) included
            return False
        return True

    await eventually(answered, timeout=30)


def close_client_connections(vhost: str) -> int:
    """Close, from the broker's side, the connections of this vhost's Clients."""
    listed = rabbitmqctl("list_connections", "pid", "vhost", "client_properties")
    pids = [
        line.split("\t")[0]
        for line in listed.splitlines()
        if f"\t{vhost}\t" in line and "sandfleet-client" in line
    ]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test: a dropped connection")
    return len(pids)


async def test_a_sync_client_works_where_a_loop_already_runs(
    broker_url: str, gateway: Gateway
) -> None:
    """As in Jupyter: this test's own loop runs in this thread."""
    with sandfleet.SyncClient(broker_url) as client:
        assert client.history("nothing-yet") == []
        with client.events(from_start=True) as stream:
            stream.mark_end()
            assert list(stream) == []  # the log holds no event yet: the marker ends it
    assert not any(t.name == "sandfleet-client" for t in threading.enumerate())


async def test_closed_clients_refuse_reuse(broker_url: str, gateway: Gateway) -> None:
    client = sandfleet.Client(broker_url)
    async with client:
        pass
    with pytest.raises(sandfleet.ClientClosed):
        await client.history("x")
    with pytest.raises(sandfleet.ClientClosed):
        await client.__aenter__()

    sync = sandfleet.SyncClient(broker_url)
    sync.open()
    sync.close()
    sync.close()  # idempotent
    with pytest.raises(sandfleet.ClientClosed):
        sync.history("x")


async def test_an_unreachable_broker_raises_fleet_unreachable_with_the_password_hidden(
    settings: Settings,
) -> None:
    url = "amqp://someone:pa55word@127.0.0.1:1/"
    with pytest.raises(sandfleet.FleetUnreachable) as raised:
        async with sandfleet.Client(url):
            pass
    assert (raised.value.url, raised.value.reason) == (
        "amqp://someone:***@127.0.0.1:1/",
        "Connection refused",
    )
    with pytest.raises(sandfleet.FleetUnreachable, match=r"someone:\*\*\*@"):
        sandfleet.SyncClient(url).history("x")
    assert not any(t.name == "sandfleet-client" for t in threading.enumerate())


async def test_a_loop_broken_off_amid_a_packed_message_goes_on_from_there(
    settings: Settings, gateway: Gateway
) -> None:
    """Three events in one log message (common.event_batches): a reader that breaks out
    after the first and iterates again gets the other two, not the next message."""
    events = [
        Event(
            job_id=f"p-{uuid.uuid4().hex[:8]}",
            phase=Phase.ACCEPTED,
            host="gw",
            driver="docker",
            submitted_by="guest",
        )
        for _ in range(3)
    ]
    connection = await aio_pika.connect(settings.broker_url)
    async with connection, connection.channel(publisher_confirms=True) as channel:
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        await EventPublisher(exchange).publish_many(events)
    wanted = {event.job_id for event in events}
    read: list[str] = []
    async with (
        sandfleet.Client(settings=settings) as client,
        client.events(phases={Phase.ACCEPTED}, from_start=True) as stream,
        asyncio.timeout(60),
    ):
        async for event in stream:
            if event.job_id in wanted:
                read.append(event.event_id)
                break
        async for event in stream:
            if event.job_id in wanted:
                read.append(event.event_id)
            if len(read) == 3:
                break
    assert read == [event.event_id for event in events]
