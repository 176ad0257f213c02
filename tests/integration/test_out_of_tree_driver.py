"""A driver from another package (tests/inmemory_driver, installed beside sandfleet as a
third party would install one) is routed to by a real gateway and run by a real worker
process, with no line about it anywhere in sandfleet."""

from __future__ import annotations

import uuid
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.workers import registry
from tests.support import submit_and_wait, until_terminal
from tests.support.processes import start_worker

pytestmark = pytest.mark.integration


def request(job_id: str, **block: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "driver": "inmemory",
        "template": {
            "image": "none",
            "command": ["echo", "hi"],
            "driver_config": {"inmemory": block, "docker": {"ignored": True}},
        },
    }


def test_sandfleet_itself_knows_nothing_of_the_driver() -> None:
    assert "inmemory" in registry.installed()
    installed = Path(str(files("sandfleet")))
    mentions = [
        path.relative_to(installed)
        for path in installed.rglob("*.py")
        if "inmemory" in path.read_text(errors="replace")
    ]
    assert mentions == []


async def test_a_real_gateway_and_worker_run_a_job_on_an_out_of_tree_driver(
    settings: Settings, client: Client
) -> None:
    worker, first_beat = await start_worker(settings, client, driver="inmemory")
    try:
        assert first_beat.driver == "inmemory"
        ok = f"ext-{uuid.uuid4().hex[:8]}"
        events = await submit_and_wait(client, request(ok, output="from a plugin\n"))
        assert [e.phase for e in events] == [
            Phase.ACCEPTED, Phase.STARTING, Phase.RUNNING, Phase.SUCCEEDED,
        ]  # fmt: skip
        assert events[-1].output == "from a plugin\n"
        assert {e.driver for e in events} == {"inmemory"}

        failing = f"ext-{uuid.uuid4().hex[:8]}"
        failed = await submit_and_wait(client, request(failing, exit_code=9))
        assert (failed[-1].phase, failed[-1].exit_code) == (Phase.FAILED, 9)

        refused = f"ext-{uuid.uuid4().hex[:8]}"
        async with client.events(job_id=refused) as stream:
            assert (await client.submit(request(refused, colour="red"))).accepted
            [*_, rejected] = await until_terminal(stream, refused)
        assert rejected.phase is Phase.REJECTED  # the driver's own parsing, by the worker
        assert [e.field for e in rejected.errors] == ["template.driver_config.inmemory.colour"]
    finally:
        worker.kill()
        await worker.wait()


async def test_a_driver_no_worker_serves_is_rejected_by_the_gateway(client: Client) -> None:
    reply = await client.submit(request(f"ext-{uuid.uuid4().hex[:8]}"))
    assert not reply.accepted
    assert [(e.field, e.message) for e in reply.errors] == [
        ("driver", "no worker serves driver 'inmemory'")
    ]
