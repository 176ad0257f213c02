"""Helpers shared by the tests: this package is their one place (no test imports another
test module, or bench/).

Here: waiting on conditions and events, never sleeping blindly. Beside it: `broker`
(AMQP as any client or operator), `cli` (the `sandfleet` command as a subprocess),
`runtimes` (real dockerd/podman/libvirt, workers on them), `private_dockerd` (extra
dockerds of a test's own: no CDI, the NVIDIA runtime), `processes` (worker processes
to signal), `gpus` (inventories, double-hold checks), `nvml` (a stand-in for pynvml),
`fakes` (the job runner on the in-memory driver), `claim_race` and `crashing_holder`
(processes for claim tests),
`fuzz_inputs` and `fuzzing` (hostile submissions, and the gateway's answers to them
judged against an oracle of the rules; bench/fuzz.py runs them by the 100,000), and
`throughput_goals` (bench/gateway_throughput.py's ratios, goals and tables).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sandfleet.common.events import Event, Phase
from sandfleet.gateway.client import Client, EventStream


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 15.0, interval: float = 0.1
) -> None:
    """Wait until `check()` is true, failing after `timeout` seconds.

    For state outside sandfleet (a runtime's container list) that offers no event to
    wait on; sandfleet's own progress is awaited through its events instead.
    """
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(interval)


async def until_terminal(stream: EventStream, job_id: str, *, timeout: float = 30.0) -> list[Event]:
    """Every event of `job_id` from `stream` up to and including its terminal one."""
    events: list[Event] = []
    async with asyncio.timeout(timeout):
        async for event in stream:
            if event.job_id != job_id:
                continue
            events.append(event)
            if event.phase.is_terminal:
                return events
    raise AssertionError(f"event stream ended before job {job_id} did: {events}")


async def until_phase(
    stream: EventStream, job_id: str, phase: Phase, *, timeout: float = 30.0
) -> Event:
    """The first event of `job_id` in `phase` from `stream`."""
    async with asyncio.timeout(timeout):
        async for event in stream:
            if event.job_id == job_id and event.phase is phase:
                return event
    raise AssertionError(f"event stream ended before job {job_id} was {phase}")


async def submit_and_wait(
    client: Client, request: dict[str, Any], *, timeout: float = 60
) -> list[Event]:
    """Submit `request` (it must be accepted) and return its events up to the terminal one."""
    job_id = request["job_id"]
    async with client.events(job_id=job_id) as stream:
        reply = await client.submit(request)
        assert reply.accepted, reply.errors
        return await until_terminal(stream, job_id, timeout=timeout)


def sleeper(image: str, seconds: float) -> dict[str, Any]:
    """A request for a job that prints "up", sleeps `seconds`, prints "done"."""
    return {
        "job_id": f"t-{uuid.uuid4().hex[:8]}",
        "template": {
            "image": image,
            "command": ["sh", "-c", f"echo up; sleep {seconds}; echo done"],
        },
    }
