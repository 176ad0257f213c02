"""A stream follower acks in batches, in order, and the last ones soon: an ack per
message cost readers dearly; an unknown (already acked) delivery tag would close the
channel; a message held unacked past the consumer timeout would too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from sandfleet.common import stream_follower
from sandfleet.common.stream_follower import ACK_EVERY, LogMessage, StreamFollower


@dataclass
class Delivery:
    delivery_tag: int
    acks: list[int]
    channel: object = None
    body: bytes = b"{}"
    routing_key: str = "running.docker.h"
    type: str = "sandfleet.event"
    message_id: str = ""
    headers: dict[str, Any] = field(default_factory=dict)
    acked: asyncio.Event = field(default_factory=asyncio.Event)

    async def ack(self, multiple: bool = False) -> None:
        assert multiple
        self.acks.append(self.delivery_tag)
        self.acked.set()


def follower(on_message: Any) -> StreamFollower:
    return StreamFollower(cast(AbstractChannel, None), "sandfleet.events.log", on_message)


async def deliver(reader: StreamFollower, delivery: Delivery) -> None:
    await reader._deliver(cast(AbstractIncomingMessage, delivery))


async def test_acks_go_in_batches_and_the_last_soon_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_follower, "ACK_AFTER_SECONDS", 0.01)
    acks: list[int] = []

    async def read(message: LogMessage, live: bool) -> None:
        pass

    reader = follower(read)
    for tag in range(1, 2 * ACK_EVERY + 6):
        last = Delivery(tag, acks, headers={"x-stream-offset": tag - 1})
        await deliver(reader, last)
    assert acks == [ACK_EVERY, 2 * ACK_EVERY]
    assert reader.next_offset == 2 * ACK_EVERY + 5
    async with asyncio.timeout(5):
        await last.acked.wait()  # the timer's ack, on a task of its own
    assert acks == [ACK_EVERY, 2 * ACK_EVERY, 2 * ACK_EVERY + 5]


async def test_a_message_held_by_its_reader_is_never_acked_twice() -> None:
    acks: list[int] = []
    held = asyncio.Event()

    async def read(message: LogMessage, live: bool) -> None:
        if cast(Delivery, message).delivery_tag == 1:
            await held.wait()  # a reader that must write before it goes on

    reader = follower(read)
    first = asyncio.create_task(deliver(reader, Delivery(1, acks)))
    for tag in range(2, ACK_EVERY + 2):
        await deliver(reader, Delivery(tag, acks))
    assert acks == [ACK_EVERY + 1]  # covers the held one (multiple)
    held.set()
    await first
    await reader._ack()  # as the timer would, with only tag 1 handled since
    assert acks == [ACK_EVERY + 1]  # tag 1 is not acked again (the broker would close)
    for tag in range(ACK_EVERY + 2, 2 * ACK_EVERY + 2):
        await deliver(reader, Delivery(tag, acks))
    assert acks == [ACK_EVERY + 1, 2 * ACK_EVERY + 1]
