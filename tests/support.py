"""Helpers for tests: waiting on conditions and events, never sleeping blindly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
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


# --- the `sandfleet` command as a subprocess (tests/integration/test_cli.py and others) ---


@dataclass(frozen=True)
class Ran:
    """A finished `sandfleet` command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def json_lines(self) -> list[Any]:
        """stdout as `--json` streams print it: one object per line."""
        return [json.loads(line) for line in self.stdout.splitlines()]


def sandfleet_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment a `sandfleet` command run for this test's broker and host gets."""
    return {
        **os.environ,
        "SANDFLEET_BROKER_URL": settings.broker_url,
        "SANDFLEET_HOST": settings.host,
        **overrides,
    }


async def spawn_sandfleet(
    env: dict[str, str], *args: str, stdin: int | None = None
) -> asyncio.subprocess.Process:
    """`python -m sandfleet ARGS` with stdout and stderr piped apart."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandfleet", *args,
        env=env, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run_sandfleet(
    env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 60
) -> Ran:
    """Run `sandfleet ARGS` to its end (at most `timeout` seconds)."""
    process = await spawn_sandfleet(
        env, *args, stdin=None if stdin is None else asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def sandfleet(settings: Settings, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run `sandfleet ARGS` against this test's broker: exit code, stdout + stderr."""
    ran = await run_sandfleet(sandfleet_env(settings), *args, stdin=stdin)
    return ran.returncode, ran.stdout + ran.stderr


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl -q ARGS` (blocking: call it through asyncio.to_thread from a test)."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def vhost_of(broker_url: str) -> str:
    return urlsplit(broker_url).path.removeprefix("/")
