"""Events packed into event-log messages: one message per routing key, bounded in count
and bytes, each job's events in order; and what a reader believes of a packed message."""

from __future__ import annotations

import json
from typing import Any

from sandfleet.common.event_batches import (
    EVENT_TYPE,
    EVENTS_TYPE,
    MAX_BYTES_PER_MESSAGE,
    MAX_EVENTS_PER_MESSAGE,
    Packed,
    events_from_log,
    packed,
)
from sandfleet.common.events import MAX_OUTPUT_CHARS, Event, Phase


def accepted(job_id: str, driver: str = "docker", **fields: Any) -> Event:
    return Event(job_id=job_id, phase=Phase.ACCEPTED, driver=driver, host="gw", **fields)


def rejected(job_id: str) -> Event:
    return Event(job_id=job_id, phase=Phase.REJECTED, host="gw")


def read_back(messages: list[Packed]) -> list[Event]:
    """Every event of `messages`, as a reader of the log gets them, in log order."""
    return [
        event
        for message in messages
        for event in events_from_log(message.body, message.routing_key, message.message_type)
    ]


def test_events_under_one_key_go_as_one_message_and_read_back_whole() -> None:
    events = [accepted(f"j{n}") for n in range(5)]
    messages = packed(events)
    assert [(m.routing_key, m.message_type, m.count) for m in messages] == [
        ("accepted.docker.gw", EVENTS_TYPE, 5)
    ]
    assert messages[0].message_id == events[0].event_id
    assert read_back(messages) == events


def test_unpacked_each_event_goes_as_itself() -> None:
    events = [accepted(f"j{n}") for n in range(3)]
    messages = packed(events, max_events=1)
    assert [(m.message_type, m.count) for m in messages] == [(EVENT_TYPE, 1)] * 3
    assert [Event.model_validate_json(m.body) for m in messages] == events


def test_a_lone_event_goes_as_itself_as_every_reader_reads_it() -> None:
    event = accepted("j")
    [message] = packed([event])
    assert message.message_type == EVENT_TYPE
    assert Event.model_validate_json(message.body) == event


def test_keys_go_in_the_order_they_first_came() -> None:
    events = [accepted("a"), rejected("b"), accepted("c", driver="podman"), accepted("d")]
    messages = packed(events)
    assert [m.routing_key for m in messages] == [
        "accepted.docker.gw", "rejected.none.gw", "accepted.podman.gw",
    ]  # fmt: skip
    assert [e.job_id for e in read_back(messages)] == ["a", "d", "b", "c"]


def test_a_jobs_events_keep_their_order_across_keys() -> None:
    # "x" comes first under the docker key, which goes after the podman run "y" opened:
    # packing "x"'s second event into that podman run would put it before its first.
    first, second = accepted("x"), accepted("x", driver="podman")
    events = [accepted("y", driver="podman"), first, second]
    read = read_back(packed(events))
    assert [e.event_id for e in read if e.job_id == "x"] == [first.event_id, second.event_id]
    assert sorted(e.event_id for e in read) == sorted(e.event_id for e in events)


def test_a_message_holds_at_most_its_bound_of_events() -> None:
    events = [accepted(f"j{n}") for n in range(2 * MAX_EVENTS_PER_MESSAGE + 1)]
    messages = packed(events)
    assert [m.count for m in messages] == [MAX_EVENTS_PER_MESSAGE, MAX_EVENTS_PER_MESSAGE, 1]
    assert read_back(messages) == events


def test_a_message_holds_at_most_its_bound_of_bytes() -> None:
    big = "x" * MAX_OUTPUT_CHARS
    events = [
        Event(job_id=f"j{n}", phase=Phase.FAILED, host="w", driver="docker", output=big)
        for n in range(2 * MAX_BYTES_PER_MESSAGE // MAX_OUTPUT_CHARS)
    ]
    messages = packed(events)
    assert len(messages) > 1
    assert all(len(m.body) <= MAX_BYTES_PER_MESSAGE for m in messages)
    assert max(len(m.body) for m in messages) > MAX_BYTES_PER_MESSAGE - MAX_OUTPUT_CHARS - 1024
    assert read_back(messages) == events


def batch_body(*events: Event) -> bytes:
    return json.dumps({"events": [json.loads(e.model_dump_json()) for e in events]}).encode()


def test_an_event_of_a_batch_under_another_key_is_not_believed() -> None:
    own = Event(job_id="mine", phase=Phase.SUCCEEDED, host="w1", driver="docker")
    forged = Event(job_id="victim", phase=Phase.SUCCEEDED, host="w2", driver="docker")
    read = events_from_log(batch_body(own, forged), own.routing_key, EVENTS_TYPE)
    assert read == [own]


def test_a_batch_that_is_no_batch_of_events_holds_none() -> None:
    key = "accepted.docker.gw"
    too_many = batch_body(*(accepted(f"j{n}") for n in range(MAX_EVENTS_PER_MESSAGE + 1)))
    big = "x" * MAX_OUTPUT_CHARS
    too_big = batch_body(
        *(accepted(f"j{n}", output=big) for n in range(MAX_BYTES_PER_MESSAGE // MAX_OUTPUT_CHARS))
    )
    assert len(too_big) > MAX_BYTES_PER_MESSAGE
    for body in (b"{}", b'{"events": []}', b'{"events": [{}]}', b"not json", too_many, too_big):
        assert events_from_log(body, key, EVENTS_TYPE) == []
    # ...and a batch under a lone event's type is no event
    assert events_from_log(batch_body(accepted("a"), accepted("b")), key, EVENT_TYPE) == []
    assert events_from_log(batch_body(accepted("a"), accepted("b")), key, None) == []
