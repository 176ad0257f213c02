"""Real worker processes for fault tests: started, waited for, signalled."""

from __future__ import annotations

import asyncio
import os
import sys

from common.events import Event, Phase
from common.settings import Settings
from gateway.client import Client


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
        **(env or {}),
    }
    async with client.events(phases={Phase.HEARTBEAT}, host=settings.host) as beats:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandfleet_cli", "worker", "--driver", driver, *args,
            env=environment, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(30):
            first = await anext(aiter(beats))
    return process, first
