"""Real worker processes for fault tests: started, waited for, signalled."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from tests.support import until_phase


async def start_worker(
    settings: Settings,
    client: Client,
    *args: str,
    driver: str = "docker",
    env: dict[str, str] | None = None,
) -> tuple[asyncio.subprocess.Process, Event]:
    """A `sandfleet worker --driver <driver>` process on the test's broker, host and
    state, returned with its first heartbeat (it serves by then)."""
    environment = {
        **os.environ,
        "SANDFLEET_BROKER_URL": settings.broker_url,
        "SANDFLEET_HOST": settings.host,
        "SANDFLEET_STATE_DIR": str(settings.state_dir),
        "SANDFLEET_JOURNAL_DIR": str(settings.journal_dir),
        "SANDFLEET_STOP_GRACE_SECONDS": "1",
        "SANDFLEET_TRUSTED_KEYS": settings.trusted_keys,
        **(env or {}),
    }
    async with client.events(phases={Phase.HEARTBEAT}, host=settings.host) as beats:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandfleet", "worker", "--driver", driver, *args,
            env=environment, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(30):
            first = await anext(aiter(beats))
    return process, first


@asynccontextmanager
async def worker_in_phase(
    settings: Settings,
    client: Client,
    stream: EventStream,
    request: dict[str, Any],
    *args: str,
    phase: Phase = Phase.RUNNING,
    driver: str = "docker",
    env: dict[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker process (`args`, `driver`, `env` as for `start_worker`) that has taken
    `request` as far as `phase` on `stream`. Killed on the way out if still alive."""
    worker, _ = await start_worker(settings, client, *args, driver=driver, env=env)
    try:
        assert (await client.submit(request)).accepted
        await until_phase(stream, request["job_id"], phase)
        yield worker
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def signal_and_wait(
    process: asyncio.subprocess.Process, sig: signal.Signals, *, bound: float = 20
) -> float:
    """Send `sig`; seconds until the process exited (at most `bound`)."""
    started = time.monotonic()
    process.send_signal(sig)
    async with asyncio.timeout(bound):
        await process.wait()
    return time.monotonic() - started
