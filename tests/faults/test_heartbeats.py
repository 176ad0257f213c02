"""Heartbeats and `sandfleet workers`: live workers per host, lost ones shown as lost."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime

import pytest

from sandfleet.common.events import Event, worker_state
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support.cli import sandfleet
from tests.support.processes import signal_and_wait, start_worker
from tests.support.runtimes import WorkerFactory

pytestmark = pytest.mark.integration


async def state_of(client: Client, worker_id: str) -> tuple[str | None, Event | None]:
    for beat in await client.workers():
        if beat.worker_id == worker_id:
            return worker_state(beat, datetime.now(UTC)), beat
    return None, None


async def until_state(client: Client, worker_id: str, wanted: str) -> Event:
    async with asyncio.timeout(20):
        while True:
            state, beat = await state_of(client, worker_id)
            if state == wanted and beat is not None:
                return beat
            await asyncio.sleep(0.2)


async def test_live_worker_is_listed_then_stopped(
    settings: Settings, client: Client, docker_worker: WorkerFactory
) -> None:
    async with docker_worker(slots=2, heartbeat_seconds=0.5) as worker:
        beat = await until_state(client, worker.identity.worker_id, "alive")
        assert (beat.host, beat.driver) == (settings.host, "docker")
        assert beat.health is not None and (beat.health.slots, beat.health.free_slots) == (2, 2)
        rc, out = await sandfleet(settings, "workers", "--json")
        assert rc == 0
        listed = {w["worker_id"]: w["state"] for w in json.loads(out)}
        assert listed[worker.identity.worker_id] == "alive"
    await until_state(client, worker.identity.worker_id, "stopped")


async def test_a_killed_worker_shows_as_lost(
    settings: Settings, client: Client, test_image: str
) -> None:
    process, first = await start_worker(
        settings, client, env={"SANDFLEET_HEARTBEAT_SECONDS": "0.5"}
    )
    try:
        worker_id = first.worker_id
        assert worker_id is not None
        await signal_and_wait(process, signal.SIGKILL)
        lost = await until_state(client, worker_id, "lost")
        assert lost.reason == "Alive"  # it never said goodbye
    finally:
        if process.returncode is None:
            process.kill()
