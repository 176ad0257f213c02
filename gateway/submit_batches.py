"""Many requests as batch submissions: what `Client.submit_many` sends and how it reads
the answers.

Requests are cut into batches of at most `batch_size` requests and of at most the
message size the gateway takes (SANDFLEET_MAX_MESSAGE_BYTES); a request too big to
share a batch, or one that is not JSON, goes alone (the gateway answers it as it
would any lone request). Each batch's body is `{"jobs": [request, …]}` assembled from
the requests' own JSON text, so bytes requests travel unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from sandfleet.common.models import BatchReply, ReplyStatus, SubmitReply

# A coroutine per batch; the typing of what `all_or_none` runs.
Sending = Coroutine[object, object, None]

_OPEN, _SEPARATOR, _CLOSE = b'{"jobs":[', b",", b"]}"


@dataclass
class Chunk:
    """Requests sent in one message: their positions among all, and their bodies."""

    positions: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)  # "" where a request names none
    alone: bool = False  # one request sent as itself, not as a batch
    size: int = len(_OPEN) + len(_CLOSE)

    @property
    def body(self) -> bytes:
        if self.alone:
            return self.bodies[0]
        return _OPEN + _SEPARATOR.join(self.bodies) + _CLOSE

    @property
    def resendable(self) -> bool:
        """Safe to send twice: every request names its job id (a repeat is a duplicate)."""
        return all(self.job_ids)


def chunks(bodies: Iterable[bytes], *, batch_size: int, max_bytes: int) -> Iterator[Chunk]:
    """`bodies` (each a request's JSON) cut into messages, in order."""
    current = Chunk()
    for position, body in enumerate(bodies):
        job_id = _job_id(body)
        if job_id is None or len(_OPEN) + len(body) + len(_CLOSE) > max_bytes:
            yield Chunk(positions=[position], bodies=[body], job_ids=[job_id or ""], alone=True)
            continue
        grown = current.size + len(body) + (len(_SEPARATOR) if current.bodies else 0)
        if current.bodies and (len(current.bodies) >= batch_size or grown > max_bytes):
            yield current
            current = Chunk()
            grown = current.size + len(body)
        current.positions.append(position)
        current.bodies.append(body)
        current.job_ids.append(job_id)
        current.size = grown
    if current.bodies:
        yield current


def replies_of(chunk: Chunk, raw: bytes) -> list[SubmitReply]:
    """The gateway's answer to `chunk`, one reply per request in it."""
    if chunk.alone:
        return [SubmitReply.model_validate_json(raw)]
    try:
        answer = BatchReply.model_validate_json(raw)
    except ValidationError:
        # A gateway that takes no batches reads one as a request with an unknown member.
        single = SubmitReply.model_validate_json(raw)
        answer = BatchReply(errors=single.errors)
    if answer.errors or len(answer.results) != len(chunk.bodies):
        # Refused as a whole: each request is answered with the batch's errors.
        return [
            SubmitReply(status=ReplyStatus.REJECTED, job_id=job_id, errors=answer.errors)
            for job_id in chunk.job_ids
        ]
    return answer.results


def _job_id(body: bytes) -> str | None:
    """The job id a request names ("" for none); None when it is no JSON object."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    job_id = data.get("job_id")
    return job_id if isinstance(job_id, str) else ""


async def all_or_none(sendings: list[Sending]) -> None:
    """Run them all; the first to fail cancels the rest, and its error is raised."""
    tasks = [asyncio.ensure_future(sending) for sending in sendings]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
