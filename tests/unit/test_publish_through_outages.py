"""A publish is made again while the broker is away, and only then."""

from __future__ import annotations

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from sandfleet.common.amqp import publish_through_outages


class Publish:
    def __init__(self, *failures: BaseException) -> None:
        self.failures, self.tries = list(failures), 0

    async def __call__(self) -> None:
        self.tries += 1
        if self.failures:
            raise self.failures.pop(0)


@pytest.mark.parametrize(
    "lost",
    [
        ChannelInvalidStateError("closed"),
        ConnectionError("reset"),
        # What aiormq sets on the confirms a channel closing without a reason leaves
        # unanswered: the publish may well have landed, so it is made again (readers
        # and journals drop a repeat), never reported as refused.
        Exception(),
    ],
)
async def test_a_publish_lost_with_the_broker_is_made_again(lost: Exception) -> None:
    publish = Publish(lost, lost)
    await publish_through_outages(publish, what="an event")
    assert publish.tries == 3


@pytest.mark.parametrize(
    "refused",
    [
        ValueError("a bug"),
        RuntimeError("another"),
    ],
)
async def test_anything_else_is_raised_at_once(refused: Exception) -> None:
    publish = Publish(refused)
    with pytest.raises(type(refused)):
        await publish_through_outages(publish, what="an event")
    assert publish.tries == 1
