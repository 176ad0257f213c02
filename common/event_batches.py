"""Several events in one event-log message: how they are packed, and how a reader unpacks
a message (one event or many) into the events it may believe.

A busy gateway publishes hundreds of `accepted` events a second, and each message costs
the broker a confirmed write into the log and every reader a delivery. Events published
together (common.event_coalescing, an echo round) go out as one message per routing key,
`{"events": [event, ...]}` under the message type EVENTS_TYPE; a lone event still goes
as itself (EVENT_TYPE), as every reader has always read it.

Every event in a message must be published under its own routing key, as a lone event
must (`event_from_log`): the broker lets each publisher use only its own keys, so
packing cannot smuggle one host's events in under another's key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from sandfleet.common.events import Event, event_from_log, logged_model

log = logging.getLogger(__name__)

EVENT_TYPE = "sandfleet.event"
EVENTS_TYPE = "sandfleet.events"
# Bounds on one message: a reader validates all of it at once, and holds a prefetch of
# messages (the job index: 100) and their events in memory before its view writes them.
MAX_EVENTS_PER_MESSAGE = 200
MAX_BYTES_PER_MESSAGE = 256 * 1024
_OPENING, _CLOSING = b'{"events":[', b"]}"


class EventBatch(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=MAX_EVENTS_PER_MESSAGE)


@dataclass(frozen=True, slots=True)
class Packed:
    """One message's worth: its routing key, type, body, and how many events it carries."""

    routing_key: str
    message_type: str
    body: bytes
    message_id: str  # its first event's id
    count: int


def events_from_log(body: bytes, routing_key: str | None, message_type: str | None) -> list[Event]:
    """The events in a message read from the event log (none, logged, for anything that
    is no event or not under its own key)."""
    if message_type != EVENTS_TYPE:
        event = event_from_log(body, routing_key)
        return [] if event is None else [event]
    if len(body) > MAX_BYTES_PER_MESSAGE:
        log.warning("skipped a %d-byte event batch: over the bound of packed events", len(body))
        return []
    batch = logged_model(EventBatch, body, "a batch of events")
    if batch is None:
        return []
    kept = [event for event in batch.events if event.routing_key == routing_key]
    if len(kept) < len(batch.events):
        log.warning(
            "skipped %d events of a batch published under routing key %r, not their own",
            len(batch.events) - len(kept),
            routing_key,
        )
    return kept


def packed(events: Sequence[Event], *, max_events: int = MAX_EVENTS_PER_MESSAGE) -> list[Packed]:
    """`events` as messages, in an order that keeps each job's events in the order given:
    one message per routing key (at most `max_events` and MAX_BYTES_PER_MESSAGE), a lone
    event as itself."""
    return [_pack(run) for run in _runs(events, max_events)]


def _runs(events: Iterable[Event], max_events: int) -> Iterator[list[tuple[Event, bytes]]]:
    """Runs of events under one key, each within the bounds, in the order their first
    events came. Every open run is closed (and a new set begun) when one is full, or
    when a job's event would go under another key than the run holding its last one:
    messages go out in run order, so a job's events keep theirs."""
    open_runs: dict[str, list[tuple[Event, bytes]]] = {}
    sizes: dict[str, int] = {}
    job_keys: dict[str, str] = {}  # job id → the key of the run holding its latest event
    for event in events:
        key, body = event.routing_key, event.model_dump_json().encode()
        run = open_runs.get(key)
        job = event.job_id
        if (job is not None and job_keys.get(job, key) != key) or (
            run is not None
            and (len(run) >= max_events or sizes[key] + len(body) > MAX_BYTES_PER_MESSAGE)
        ):
            yield from open_runs.values()
            open_runs.clear()
            sizes.clear()
            job_keys.clear()
            run = None
        if run is None:
            run = open_runs[key] = []
            sizes[key] = len(_OPENING) + len(_CLOSING) - 1  # less the first's comma
        run.append((event, body))
        sizes[key] += len(body) + 1
        if job is not None:
            job_keys[job] = key
    yield from open_runs.values()


def _pack(run: list[tuple[Event, bytes]]) -> Packed:
    if len(run) == 1:
        body, message_type = run[0][1], EVENT_TYPE
    else:
        body = _OPENING + b",".join(body for _, body in run) + _CLOSING
        message_type = EVENTS_TYPE
    return Packed(
        routing_key=run[0][0].routing_key,
        message_type=message_type,
        body=body,
        message_id=run[0][0].event_id,
        count=len(run),
    )
