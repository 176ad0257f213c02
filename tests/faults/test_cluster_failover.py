"""A RabbitMQ cluster loses a node while jobs flow: the gateway, two workers and the
client, given every node's URL, move to another node; no accepted job is lost, none
runs twice, and each event is read once.

The cluster is `./dev cluster` (three nodes on 5681-5683), started here if it is not
running; each test has its own vhost on it, with the policies of a fleet (leaders
spread over the nodes). Two nodes are stopped in turn while jobs are being submitted,
each started again: the one that leads the job queue, and node 1, the one every
process connected to first.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from sandfleet.common.broker_urls import vhost_of
from sandfleet.common.event_replay import ECHO_AFTER_SECONDS
from sandfleet.common.events import Event, Phase
from sandfleet.common.topology import job_queue_name
from sandfleet.gateway.client import Client, EventStream
from tests.support import eventually
from tests.support.cluster import (
    NODES,
    any_running_node,
    cluster_vhost,
    ctl,
    queue_leader,
    start_node,
    stop_node,
)
from tests.support.runtimes import WorkerFactory, docker_creations

pytestmark = pytest.mark.integration

SUBMIT_PACE_SECONDS = 0.1
TERMINAL_TIMEOUT_SECONDS = 180


@pytest.fixture
def broker_url() -> Iterator[str]:
    """Every fixture of this module (settings, gateway, client, workers) on the cluster."""
    with cluster_vhost() as urls:
        yield urls


def job(image: str) -> dict[str, Any]:
    return {
        "job_id": f"cl-{uuid.uuid4().hex[:8]}",
        "template": {"image": image, "command": ["sh", "-c", "echo ok"]},
    }


async def submit_until(client: Client, image: str, node_down: asyncio.Event) -> list[str]:
    """Submit jobs one after another until `node_down` is set, then one more: the node
    goes down while submissions are in flight. Their job ids."""
    submitted = []
    while True:
        request = job(image)
        # Named job ids: the client sends again by itself when its node goes away.
        assert (await client.submit(request, timeout=120)).accepted
        submitted.append(request["job_id"])
        if node_down.is_set():
            return submitted
        await asyncio.sleep(SUBMIT_PACE_SECONDS)  # a steady flow of load, not a wait


async def terminal_events(stream: EventStream, job_ids: set[str]) -> dict[str, list[Event]]:
    """Every terminal event of these jobs, until each has one; on a timeout, an error
    naming each job still without one and the phases it reached."""
    seen: dict[str, list[Event]] = {job_id: [] for job_id in job_ids}
    phases: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    try:
        async with asyncio.timeout(TERMINAL_TIMEOUT_SECONDS):
            async for event in stream:
                if event.job_id in seen:
                    phases[event.job_id].append(event.phase.value)
                    if event.phase.is_terminal:
                        seen[event.job_id].append(event)
                        if all(seen.values()):
                            return seen
    except TimeoutError:
        unended = {job_id: phases[job_id] for job_id, ends in seen.items() if not ends}
        raise AssertionError(f"jobs with no terminal event: {unended}") from None
    raise AssertionError("the event stream ended")


async def phases_in_log(broker_url: str, job_ids: set[str]) -> dict[str, Counter[Phase]]:
    """Each job's events in the log by phase, read from its start by a new client."""
    counted: dict[str, Counter[Phase]] = {job_id: Counter() for job_id in job_ids}
    async with Client(broker_url) as reader, reader.events(from_start=True) as log:
        async for event in log.history():
            if event.job_id in counted:
                counted[event.job_id][event.phase] += 1
    return counted


async def terminal_in_log(broker_url: str, job_ids: set[str]) -> set[str]:
    """The jobs whose terminal event the log holds, read from its start by a new client."""
    async with Client(broker_url) as reader, reader.events(from_start=True) as log:
        ended = {e.job_id or "" for e in [e async for e in log.history()] if e.phase.is_terminal}
    return ended & job_ids


def queue_state(broker_url: str) -> str:
    vhost = vhost_of(broker_url)
    columns = ("name", "messages_ready", "messages_unacknowledged", "consumers")
    return ctl(any_running_node(), "list_queues", "-p", vhost, *columns)


async def stop_leader(broker_url: str, queue: str) -> str:
    """Stop the node that leads `queue` now; its name."""
    vhost = vhost_of(broker_url)
    leader = await asyncio.to_thread(queue_leader, vhost, queue)
    await asyncio.to_thread(stop_node, leader)
    return leader


async def stop_first_node() -> str:
    """Stop node 1, which every process connected to first."""
    await asyncio.to_thread(stop_node, NODES[0])
    return NODES[0]


async def test_a_lost_node_loses_no_job_and_runs_none_twice(
    broker_url: str, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    queue = job_queue_name("docker")
    stopped: list[str] = []
    job_ids: set[str] = set()
    async with (
        contextlib.AsyncExitStack() as runtime_events,
        docker_worker(slots=2),
        docker_worker(slots=2),  # the same host: one journal, as two workers of a host
        client.events() as stream,
    ):
        created = runtime_events.enter_context(docker_creations())
        # The job queue's leader, then (if that was another) node 1, the one everyone
        # is on: submissions go on through its loss, so the client has moved, and every
        # job ending proves that the gateway and the workers have.
        for _ in range(2):
            node_down = asyncio.Event()
            flow = asyncio.create_task(submit_until(client, test_image, node_down))
            if stopped and NODES[0] not in stopped:
                stopped.append(await stop_first_node())
            else:
                stopped.append(await stop_leader(broker_url, queue))
            node_down.set()
            job_ids.update(await flow)
            await asyncio.to_thread(start_node, stopped[-1])
        try:
            ends = await terminal_events(stream, job_ids)
        except AssertionError as failed:
            per_node = {
                url.split("@")[1].split("/")[0]: len(await terminal_in_log(url, job_ids))
                for url in broker_url.split(",")
            }
            raise AssertionError(
                f"{failed}; read afresh through each node, the log has terminal events of"
                f" {per_node} of {len(job_ids)} jobs; containers created: {dict(created)};"
                f" queues now:\n{queue_state(broker_url)}"
            ) from None

    assert len(stopped) == 2 and NODES[0] in stopped
    assert {job_id: len(events) for job_id, events in ends.items()} == dict.fromkeys(job_ids, 1)
    assert {events[0].phase for events in ends.values()} == {Phase.SUCCEEDED}
    assert Counter(created[job_id] for job_id in job_ids) == Counter({1: len(job_ids)})

    # The log holds each job's `accepted` and `succeeded` once, as read (an event a
    # stream lost around a leader change is echoed within ECHO_AFTER_SECONDS + a round).
    odd: dict[str, Counter[Phase]] = {}

    async def each_once() -> bool:
        counted = await phases_in_log(broker_url, job_ids)
        odd.clear()
        odd.update(
            (job_id, phases)
            for job_id, phases in counted.items()
            if not phases[Phase.ACCEPTED] == phases[Phase.SUCCEEDED] == 1
        )
        return not odd

    try:
        await eventually(each_once, timeout=ECHO_AFTER_SECONDS + 60, interval=5)
    except TimeoutError:
        raise AssertionError(f"jobs whose events the log does not hold once: {odd}") from None
