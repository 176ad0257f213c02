"""Batch submissions against a real broker and gateway: `{"jobs": [...]}` answered by
`{"results": [...]}` in order, each request on its own; `Client.submit_many` and
`sandfleet submit -f sweep.jsonl` on top."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.models import BatchReply
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from tests.support.broker import raw_submit
from tests.support.cli import run_sandfleet, sandfleet_env
from tests.support.job_queues import job_queue, queued_jobs

pytestmark = pytest.mark.integration


def request(job_id: str | None = None, image: str = "busybox", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"template": {"image": image, "command": ["true"]}, **extra}
    if job_id is not None:
        body["job_id"] = job_id
    return body


def new_id() -> str:
    return f"b-{uuid.uuid4().hex[:10]}"


async def test_a_batch_answers_each_request_on_its_own_in_order(
    settings: Settings, client: Client
) -> None:
    queue = await job_queue(settings.broker_url)
    first, other = new_id(), new_id()
    batch = {
        "jobs": [
            request(first),
            request(new_id(), image=""),  # invalid: an empty image
            request(first),  # the same job again: a duplicate of the first
            request(),  # no id: the gateway names it
            request(other, labels={"sandfleet.x": "y"}),  # reserved label
            "not a request",
        ]
    }
    reply = BatchReply.model_validate_json(
        json.dumps(await raw_submit(settings.broker_url, json.dumps(batch).encode()))
    )
    results = reply.results
    assert not reply.errors
    assert [r.status.value for r in results] == [
        "accepted", "rejected", "accepted", "accepted", "rejected", "rejected",
    ]  # fmt: skip
    assert results[0].job_id == first and not results[0].duplicate
    assert results[2].job_id == first and results[2].duplicate
    assert results[2].phase is Phase.ACCEPTED
    assert [e.field for e in results[1].errors] == ["template.image"]
    assert [e.field for e in results[4].errors] == ["labels"]
    assert results[5].errors and results[5].errors[0].field == "request"
    named = results[3].job_id
    assert named.startswith("job-")
    assert await queued_jobs(settings.broker_url, queue) == {first: 1, named: 1}
    history = await client.history(first)
    assert [e.phase for e in history] == [Phase.ACCEPTED]
    rejected = await client.history(other)
    assert [e.phase for e in rejected] == [Phase.REJECTED]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"jobs": []}, "jobs"),
        ({"jobs": {"job_id": "x"}}, "jobs"),
        ({"jobs": [{}, {}, {}, {}]}, "jobs"),  # over max_batch=3
        ({"jobs": [{}], "priority": 1}, "priority"),
    ],
)
async def test_a_batch_refused_as_a_whole_names_why(
    make_settings: Callable[..., Settings], body: dict[str, Any], field: str
) -> None:
    settings = make_settings(max_batch=3)
    async with Gateway(settings):
        reply = BatchReply.model_validate_json(
            json.dumps(await raw_submit(settings.broker_url, json.dumps(body).encode()))
        )
    assert not reply.results
    assert [e.field for e in reply.errors] == [field]


async def test_submit_many_queues_every_accepted_job_once(
    settings: Settings, client: Client
) -> None:
    queue = await job_queue(settings.broker_url)
    requests = [request(new_id()) for _ in range(1200)]
    requests[7] = request(new_id(), image="")
    requests[900] = request(requests[899]["job_id"])  # across batches: the same job
    replies = await client.submit_many(requests, batch_size=100, in_flight=3)
    assert [r.job_id for r in replies] == [r["job_id"] for r in requests]
    assert not replies[7].accepted
    assert replies[900].accepted and replies[900].duplicate
    assert sum(r.accepted and not r.duplicate for r in replies) == 1198
    copies = await queued_jobs(settings.broker_url, queue)
    assert len(copies) == 1198 and set(copies.values()) == {1}

    again = await client.submit_many(requests[:300], batch_size=100)
    assert all(r.duplicate for i, r in enumerate(again) if i != 7)
    assert await queued_jobs(settings.broker_url, queue) == {}


@pytest.mark.parametrize(("pack", "messages"), [(True, range(1, 31)), (False, [300])])
async def test_a_sweeps_accepted_events_go_packed_unless_told_not_and_are_each_read_once(
    make_settings: Callable[..., Settings], pack: bool, messages: range | list[int]
) -> None:
    """The `accepted` events of a batch's jobs go into the log together (a few messages,
    not one each: common.event_coalescing), or one message each with SANDFLEET_PACK_EVENTS
    false; every reader sees each event once either way."""
    settings = make_settings(pack_events=pack)
    await job_queue(settings.broker_url)  # a route for the jobs
    async with Gateway(settings) as gateway, Client(settings=settings) as client:
        index = gateway.jobs
        assert index is not None
        read = index.read
        requests = [request(new_id()) for _ in range(300)]
        replies = await client.submit_many(requests, batch_size=100)
        assert all(reply.accepted and not reply.duplicate for reply in replies)
        # The gateway read every one back (each job was queued only after that)...
        assert index.read - read in messages
        seen = Counter[str]()
        async with client.events(phases={Phase.ACCEPTED}, from_start=True) as stream:
            async for event in stream.history():
                seen[event.job_id or ""] += 1
    assert seen == Counter({r["job_id"]: 1 for r in requests})  # ...and so does any reader


async def test_submit_many_cuts_batches_by_size_in_bytes(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_message_bytes=4096)
    queue = await job_queue(settings.broker_url)
    requests = [request(new_id(), labels={"pad": "x" * 500}) for _ in range(30)]
    requests.append(request(new_id(), labels={"pad": "x" * 5000}))  # too big for any message
    async with Gateway(settings), Client(settings=settings) as client:
        replies = await client.submit_many(requests)
    assert all(r.accepted for r in replies[:30])
    assert not replies[30].accepted and replies[30].errors[0].field == "request"
    assert len(await queued_jobs(settings.broker_url, queue)) == 30


async def test_sandfleet_submit_a_sweep_file(
    settings: Settings, gateway: Gateway, tmp_path: Path
) -> None:
    queue = await job_queue(settings.broker_url)
    sweep = tmp_path / "sweep.jsonl"
    lines = [json.dumps(request(new_id())) for _ in range(50)]
    lines[10] = json.dumps(request(new_id(), image=""))
    sweep.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    env = sandfleet_env(settings)

    ran = await run_sandfleet(env, "submit", "-f", str(sweep))
    assert ran.returncode == 2, ran.stderr
    assert "50 submitted" in ran.stdout and "49 accepted" in ran.stdout
    assert "1 rejected" in ran.stdout and "line 11: rejected" in ran.stdout
    assert "template.image" in ran.stdout

    as_json = await run_sandfleet(env, "submit", "--json", "-f", str(sweep))
    documents = as_json.json_lines
    assert [d["line"] for d in documents] == [*range(1, 21), *range(22, 52)]
    assert sum(bool(d.get("duplicate")) for d in documents) == 49
    assert len(await queued_jobs(settings.broker_url, queue)) == 49

    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n[1, 2]\n")
    refused = await run_sandfleet(env, "submit", "-f", str(bad))
    assert refused.returncode == 2 and "line 2" in refused.stderr
