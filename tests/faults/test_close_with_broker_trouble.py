"""A worker or gateway closing while the broker gives trouble still closes its
connections, and so lets its process exit.

A robust connection left open reconnects forever in a task that ignores
cancellation (aio-pika#414): a CI run hung for an hour on a worker whose job channel
was not yet restored after its connection was dropped, when its drain failed before
the connections were closed. The faults are injected at the point that failed then
(a consumer's cancel on a channel that is down) on a real broker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest
from aio_pika import RobustQueue

from sandfleet.common.settings import Settings
from sandfleet.gateway.service import Gateway
from sandfleet.workers.intake import JobIntake
from sandfleet.workers.runtime import Worker
from tests.support import eventually
from tests.support.broker import rabbitmqctl, vhost_of
from tests.support.runtimes import registered_driver, worker_factory

pytestmark = pytest.mark.integration


def channel_down(*_: Any, **__: Any) -> Any:
    raise aiormq.exceptions.ChannelInvalidStateError("<Channel: '1'> closed")


def broken(*_: Any, **__: Any) -> Any:
    raise RuntimeError("injected")


def connections_of(worker: Worker) -> list[Any]:
    session = worker._connected  # what the worker holds; no public handle to it
    assert session is not None
    return [session.connection, session.logs_connection]


async def test_a_worker_whose_job_channel_is_down_drains_and_closes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = worker_factory(settings, registered_driver("inmemory"))
    async with start(slots=2) as worker:
        session = worker._connected
        assert session is not None
        job_queues, cancel = session.intake._queues, RobustQueue.cancel

        async def cancel_on_a_channel_down(queue: RobustQueue, *args: Any, **kwargs: Any) -> Any:
            if queue in job_queues:
                channel_down()
            return await cancel(queue, *args, **kwargs)

        # RobustQueue has __slots__: the method is replaced on the class, for these queues
        monkeypatch.setattr(RobustQueue, "cancel", cancel_on_a_channel_down)
        async with asyncio.timeout(30):
            await worker.aclose()  # no error: the consumers went with their channel
        assert all(connection.is_closed for connection in connections_of(worker))


async def test_a_worker_closes_its_connections_when_its_shutdown_fails(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = worker_factory(settings, registered_driver("inmemory"))
    async with start(slots=1) as worker:
        monkeypatch.setattr(worker.warm, "aclose", broken)
        async with asyncio.timeout(30):
            with pytest.raises(RuntimeError, match="injected"):
                await worker.aclose()
        assert all(connection.is_closed for connection in connections_of(worker))


async def test_a_gateway_closes_its_connection_when_its_shutdown_fails(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = await Gateway(settings).__aenter__()  # closed below, by hand
    connection = gateway._connection  # no public handle to it
    assert connection is not None and gateway._events is not None
    monkeypatch.setattr(gateway._events, "aclose", broken)
    async with asyncio.timeout(30):
        with pytest.raises(RuntimeError, match="injected"):
            await gateway.aclose()
    assert connection.is_closed


async def test_a_worker_that_fails_to_start_leaves_no_connection_open(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(JobIntake, "start", broken)  # after both connections are made
    start = worker_factory(settings, registered_driver("inmemory"))
    with pytest.raises(RuntimeError, match="injected"):
        async with start(slots=1):
            pass
    vhost = vhost_of(settings.broker_url)

    async def no_worker_connection() -> bool:
        listed = await asyncio.to_thread(
            rabbitmqctl, "list_connections", "vhost", "client_properties"
        )
        return not any(
            line.startswith(f"{vhost}\t") and "sandfleet-worker" in line
            for line in listed.splitlines()
        )

    await eventually(no_worker_connection, timeout=15)
