"""Batch submissions: `{"jobs": [request, …]}` in one message, `{"results": [reply, …]}`
in one reply.

Each request of a batch is validated and admitted on its own, exactly as if it had come
alone (its own `accepted` or `rejected` event, its own reply), and `results[i]` answers
`jobs[i]`: error paths inside a result are the request's own (`template.image`), the
position says which request. All of a batch's requests go through at once, so their
events are published back to back and confirmed together, then their jobs. A job id
twice in one batch is one job: the second is answered as a duplicate of the first.

The batch is answered (and acked) once every request in it is settled. If the broker
fails some of them, the batch is delivered again: the requests already accepted are
answered as duplicates (their jobs queued if they were not yet), the rest are admitted.

What refuses a batch as a whole (its reply has `errors` and no results, its `rejected`
event a fresh id): a member beside `jobs`, `jobs` not a list, an empty list, or more
than SANDFLEET_MAX_BATCH requests. A body over SANDFLEET_MAX_MESSAGE_BYTES, or not JSON,
is no batch: it is answered as a single malformed request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from sandfleet.common.errors import FieldError, MessageUndecodable, RequestInvalid
from sandfleet.common.models import BatchReply, SubmitReply
from sandfleet.gateway.envelope import decode

BATCH_MEMBER = "jobs"

Answer = Callable[[bytes, Any], Awaitable[SubmitReply]]


def batch_items(body: bytes, *, max_bytes: int, max_batch: int) -> list[Any] | None:
    """The requests of a batch submission, decoded; None when `body` is not a JSON object
    with a `jobs` member (a single request: too big or not JSON, it is answered as one).

    RequestInvalid (naming `jobs`) for a batch refused as a whole.
    """
    if f'"{BATCH_MEMBER}"'.encode() not in body:  # cheap: most submissions are single
        return None
    try:
        data = decode(body, max_bytes=max_bytes)
    except MessageUndecodable:
        return None
    if not isinstance(data, dict) or BATCH_MEMBER not in data:
        return None  # a single request that mentions "jobs" somewhere inside
    extra = sorted(key for key in data if key != BATCH_MEMBER)
    if extra:
        raise RequestInvalid([FieldError(field=extra[0], message="extra inputs are not permitted")])
    items = data[BATCH_MEMBER]
    if not isinstance(items, list):
        raise RequestInvalid([FieldError(field=BATCH_MEMBER, message="must be a list of requests")])
    if not items:
        raise RequestInvalid([FieldError(field=BATCH_MEMBER, message="holds no requests")])
    if len(items) > max_batch:
        message = f"holds {len(items)} requests; the limit is {max_batch} (SANDFLEET_MAX_BATCH)"
        raise RequestInvalid([FieldError(field=BATCH_MEMBER, message=message)])
    return items


def item_body(item: Any) -> bytes:
    """One request of a batch as JSON text, validated as a lone submission's body is
    (strict JSON mode). JSON decoded here (no NaN, bounded integers) dumps back as it was."""
    return json.dumps(item, separators=(",", ":")).encode()


async def answer_batch(items: list[Any], answer: Answer) -> BatchReply:
    """Every request admitted at once, each by `answer(body, decoded)`; their replies in
    order. If any raised (the broker failed it), raises the first once all are settled."""
    outcomes = await asyncio.gather(
        *(answer(item_body(item), item) for item in items), return_exceptions=True
    )
    results: list[SubmitReply] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return BatchReply(results=results)


def refused_batch(error: RequestInvalid) -> BatchReply:
    """The reply to a batch refused as a whole."""
    return BatchReply(errors=error.errors)
