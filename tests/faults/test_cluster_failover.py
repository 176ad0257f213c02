"""A RabbitMQ cluster loses a node while jobs flow: the gateway, two workers and the
client, given every node's URL, move to another node; no accepted job is lost, none
runs twice, and each event is read once.

The cluster is `./dev cluster` (three nodes on 5681-5683), started here if it is not
running; each test has its own vhost on it. The node stopped is the one that leads
the job queue, which is also the one every process connected to first (node 1 is
first in the list, and a queue's leader is by default the node that declared it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from sandfleet.common.events import Event, Phase
from sandfleet.common.topology import job_queue_name
from sandfleet.gateway.client import Client, EventStream
from tests.support.broker import vhost_of
from tests.support.cluster import cluster_vhost, queue_leader, start_node, stop_node
from tests.support.runtimes import WorkerFactory, sandboxes_created

pytestmark = pytest.mark.integration

JOBS = 24
TERMINAL_TIMEOUT_SECONDS = 300


@pytest.fixture
def broker_url() -> Iterator[str]:
    """Every fixture of this module (settings, gateway, client, workers) on the cluster."""
    with cluster_vhost() as urls:
        yield urls


def job(image: str) -> dict[str, Any]:
    return {
        "job_id": f"cl-{uuid.uuid4().hex[:8]}",
        "template": {"image": image, "command": ["sh", "-c", "echo ok; sleep 1"]},
    }


async def submit_all(client: Client, jobs: list[dict[str, Any]]) -> None:
    for request in jobs:
        # Named job ids: the client sends again by itself when its node goes away.
        assert (await client.submit(request, timeout=120)).accepted


async def terminal_events(stream: EventStream, job_ids: set[str]) -> dict[str, list[Event]]:
    """Every terminal event of these jobs, until each has one."""
    seen: dict[str, list[Event]] = {job_id: [] for job_id in job_ids}
    async with asyncio.timeout(TERMINAL_TIMEOUT_SECONDS):
        async for event in stream:
            if event.job_id in seen and event.phase.is_terminal:
                seen[event.job_id].append(event)
                if all(seen.values()):
                    return seen
    raise AssertionError("the event stream ended")


async def lose_leader(broker_url: str, queue: str) -> str:
    """Stop the node that leads `queue` now; its name."""
    leader = await asyncio.to_thread(queue_leader, vhost_of(broker_url.split(",", maxsplit=1)[0]), queue)
    await asyncio.to_thread(stop_node, leader)
    return leader


async def test_a_lost_node_loses_no_job_and_runs_none_twice(
    broker_url: str, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    since = time.time()
    jobs = [job(test_image) for _ in range(JOBS)]
    job_ids = {request["job_id"] for request in jobs}
    queue = job_queue_name("docker")
    stopped = []
    async with (
        docker_worker(slots=2),
        docker_worker(slots=2),  # the same host: one journal, as two workers of a host
        client.events() as stream,
    ):
        ended = asyncio.create_task(terminal_events(stream, job_ids))
        await submit_all(client, jobs[: JOBS // 3])
        stopped.append(await lose_leader(broker_url, queue))
        await submit_all(client, jobs[JOBS // 3 : 2 * JOBS // 3])
        await asyncio.to_thread(start_node, stopped[-1])
        stopped.append(await lose_leader(broker_url, queue))
        await submit_all(client, jobs[2 * JOBS // 3 :])
        await asyncio.to_thread(start_node, stopped[-1])
        ends = await ended

    assert len(stopped) == 2
    assert {job_id: len(events) for job_id, events in ends.items()} == dict.fromkeys(job_ids, 1)
    assert {events[0].phase for events in ends.values()} == {Phase.SUCCEEDED}
    created = sandboxes_created("docker", since)
    assert Counter(created[job_id] for job_id in job_ids) == Counter({1: JOBS})
    for job_id in sorted(job_ids)[:4]:  # the log holds each event once, as read
        phases = [event.phase for event in await client.history(job_id)]
        assert phases.count(Phase.ACCEPTED) == 1 and phases.count(Phase.SUCCEEDED) == 1
