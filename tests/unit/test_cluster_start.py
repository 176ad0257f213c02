"""Start-up on a cluster node still bringing up its replicas is tried again; any other
refusal is raised at once. Each failed try is undone first."""

from __future__ import annotations

import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed, ConnectionClosed

from sandfleet.common.cluster_start import start_when_cluster_ready
from sandfleet.gateway.events_stream import EventFilter, EventStream
from sandfleet.gateway.gateway_requests import GatewayRequests, _ConnectionLost

NO_REPLICA = ChannelPreconditionFailed(
    "PRECONDITION_FAILED - queue 'sandfleet.control.log' in vhost 'v' does not have a"
    " replica on the local node"
)


class Start:
    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.tries = self.undone = 0

    async def start(self) -> str:
        self.tries += 1
        if self.failures:
            raise self.failures.pop(0)
        return "started"

    async def undo(self) -> None:
        self.undone += 1


async def test_a_node_still_starting_its_replicas_is_waited_for() -> None:
    start = Start(NO_REPLICA, NO_REPLICA)
    assert await start_when_cluster_ready(start.start, start.undo) == "started"
    assert (start.tries, start.undone) == (3, 2)


async def test_a_node_stopped_mid_start_is_left_for_another() -> None:
    forced = ConnectionClosed(320, "CONNECTION_FORCED - broker forced connection closure")
    start = Start(forced)
    assert await start_when_cluster_ready(start.start, start.undo) == "started"
    assert (start.tries, start.undone) == (2, 1)


async def test_any_other_refusal_is_raised_at_once_and_undone() -> None:
    start = Start(ChannelAccessRefused("ACCESS_REFUSED - no access to 'sandfleet.events'"))
    with pytest.raises(ChannelAccessRefused):
        await start_when_cluster_ready(start.start, start.undo)
    assert (start.tries, start.undone) == (1, 1)


async def test_a_node_that_never_gets_there_is_given_up() -> None:
    start = Start(*[NO_REPLICA] * 10)
    with pytest.raises(ChannelPreconditionFailed):
        await start_when_cluster_ready(start.start, start.undo, within=0.5)
    assert start.tries == start.undone >= 1


class LogChannel:
    """A channel whose stream consumer is refused while its node is still starting."""

    def __init__(self, starting: bool) -> None:
        self.starting, self.closed, self.consumed = starting, False, False

    async def set_qos(self, prefetch_count: int) -> None:
        pass

    async def declare_queue(self, name: str, passive: bool) -> LogChannel:
        return self

    async def consume(self, callback: object, arguments: dict[str, object]) -> None:
        if self.starting:
            raise NO_REPLICA
        self.consumed = True

    async def close(self) -> None:
        self.closed = True


class NodeStillStarting:
    """A connection to a node whose log replica comes up after `refusals` tries."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.channels = refusals, list[LogChannel]()

    async def channel(self) -> LogChannel:
        self.channels.append(LogChannel(starting=len(self.channels) < self.refusals))
        return self.channels[-1]


async def test_a_reader_subscribing_through_a_node_still_starting_waits_for_it() -> None:
    """`Client.events()` (watch, run, history) on a node that has just restarted: each
    refused channel is closed and the subscription made afresh, until the node has its
    replica; then the reader reads from the fresh channel."""
    node = NodeStillStarting(refusals=1)
    stream = EventStream(node, EventFilter(), offset="first")  # type: ignore[arg-type]
    async with stream:
        assert [(c.closed, c.consumed) for c in node.channels] == [(True, False), (False, True)]


class RefusingExchange:
    async def publish(self, message: object, routing_key: str, mandatory: bool) -> None:
        raise NO_REPLICA


class RestoringChannel:
    """A client's channel while its connection restores a log consumer on a node still
    starting: what is published meanwhile fails with the node's refusal."""

    async def get_exchange(self, name: str, ensure: bool) -> RefusingExchange:
        return RefusingExchange()


async def test_a_request_cut_by_a_node_still_starting_counts_as_lost_and_is_sent_again() -> None:
    requests = GatewayRequests(None, RestoringChannel(), "the broker", "alice")  # type: ignore[arg-type]
    requests._exchanges_seen.add("sandfleet.submit")
    with pytest.raises(_ConnectionLost):
        await requests._publish(b"{}", "sandfleet.submit", "c-1", "sandfleet.submit")
