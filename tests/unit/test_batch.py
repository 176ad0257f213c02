"""Batch submissions without a broker: what is a batch, what refuses one as a whole, how
its requests are answered in order; and how `Client.submit_many` cuts requests into
messages and reads the answers."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from sandfleet.common.errors import FieldError, RequestInvalid
from sandfleet.common.models import BatchReply, ReplyStatus, SubmitReply
from sandfleet.gateway.batch import answer_batch, batch_items, item_body
from sandfleet.gateway.submit_batches import Chunk, chunks, replies_of


def items(body: Any, *, max_batch: int = 10) -> list[Any] | None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return batch_items(raw, max_bytes=1 << 20, max_batch=max_batch)


def test_a_single_request_is_no_batch() -> None:
    assert items({"template": {"image": "busybox", "command": ["echo", "jobs"]}}) is None
    assert items(b'{"jobs": [') is None  # not JSON: answered as a lone malformed request
    assert items(b'["jobs"]') is None


def test_a_batch_gives_its_requests_in_order() -> None:
    assert items({"jobs": [{"job_id": "a"}, "x", 3]}) == [{"job_id": "a"}, "x", 3]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"jobs": []}, "jobs", "no requests"),
        ({"jobs": {"job_id": "a"}}, "jobs", "list"),
        ({"jobs": [{}] * 11}, "jobs", "11 requests; the limit is 10"),
        ({"jobs": [{}], "labels": {}}, "labels", "not permitted"),
    ],
)
def test_what_refuses_a_batch_as_a_whole(body: Any, field: str, words: str) -> None:
    with pytest.raises(RequestInvalid) as refused:
        items(body)
    [error] = refused.value.errors
    assert error.field == field and words in error.message


def test_an_items_body_is_its_json_as_sent() -> None:
    item = {"job_id": "a", "template": {"environment": {"N": "é"}, "timeout_seconds": 10**30}}
    assert json.loads(item_body(item)) == item
    decoded = items(json.dumps({"jobs": [item]}).encode())
    assert decoded is not None and json.loads(item_body(decoded[0])) == item


def reply(job_id: str, accepted: bool = True) -> SubmitReply:
    status = ReplyStatus.ACCEPTED if accepted else ReplyStatus.REJECTED
    return SubmitReply(status=status, job_id=job_id)


async def test_a_batchs_replies_come_in_its_order_whatever_order_they_settle_in() -> None:
    chooser = random.Random(7)

    async def answer(body: bytes, data: Any) -> SubmitReply:
        await asyncio.sleep(chooser.random() / 100)
        return reply(data["job_id"], accepted=data["job_id"] != "j3")

    answered = await answer_batch([{"job_id": f"j{i}"} for i in range(20)], answer)
    assert [r.job_id for r in answered.results] == [f"j{i}" for i in range(20)]
    assert [r.accepted for r in answered.results].count(False) == 1


async def test_a_batch_with_a_failed_request_raises_once_every_request_is_settled() -> None:
    settled: list[str] = []

    async def answer(body: bytes, data: Any) -> SubmitReply:
        if data == "bad":
            raise ConnectionError("the broker went away")
        await asyncio.sleep(0.01)
        settled.append(data)
        return reply(data)

    with pytest.raises(ConnectionError):
        await answer_batch(["a", "bad", "c"], answer)
    assert sorted(settled) == ["a", "c"]


def request(job_id: str = "", pad: int = 0) -> bytes:
    body: dict[str, Any] = {"template": {"image": "x" * pad or "busybox"}}
    if job_id:
        body["job_id"] = job_id
    return json.dumps(body).encode()


def test_requests_are_cut_by_count_and_kept_in_order() -> None:
    cut = list(chunks([request(f"j{i}") for i in range(7)], batch_size=3, max_bytes=1 << 20))
    assert [c.positions for c in cut] == [[0, 1, 2], [3, 4, 5], [6]]
    assert json.loads(cut[0].body) == {"jobs": [json.loads(request(f"j{i}")) for i in range(3)]}
    assert all(c.resendable for c in cut)


def test_requests_are_cut_by_size_and_the_odd_ones_go_alone() -> None:
    bodies = [request("a", 500), request("b", 500), b"not json", request("c", 2000), request()]
    cut = sorted(chunks(bodies, batch_size=100, max_bytes=1000), key=lambda c: c.positions)
    assert [(c.positions, c.alone) for c in cut] == [
        ([0], False), ([1, 4], False), ([2], True), ([3], True),
    ]  # fmt: skip
    assert all(len(c.body) <= 1000 for c in cut if not c.alone)
    assert cut[0].resendable
    assert not cut[1].resendable  # one names no job id: sent twice, it would be two jobs


def test_the_answers_to_a_chunk() -> None:
    chunk = Chunk(positions=[0, 1], bodies=[request("a"), request("b")], job_ids=["a", "b"])
    answer = BatchReply(results=[reply("a"), reply("b", accepted=False)])
    assert replies_of(chunk, answer.model_dump_json().encode()) == answer.results
    refused = BatchReply(errors=[FieldError(field="jobs", message="too many")])
    as_whole = replies_of(chunk, refused.model_dump_json().encode())
    assert [(r.job_id, r.accepted, r.errors) for r in as_whole] == [
        ("a", False, refused.errors), ("b", False, refused.errors),
    ]  # fmt: skip
    # A gateway that takes no batches reads one as a request with an unknown member.
    old = SubmitReply(
        status=ReplyStatus.REJECTED,
        job_id="job-1",
        errors=[FieldError(field="jobs", message="Extra inputs are not permitted")],
    )
    assert all(r.errors == old.errors for r in replies_of(chunk, old.model_dump_json().encode()))
