"""`sandfleet worker`: run one driver's worker on this host."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from common.lifecycle import until_signalled
from common.logs import setup_logging
from common.models import Driver
from common.settings import Settings
from workers.drivers.base import SandboxDriver
from workers.runtime import Worker


def make_driver(kind: Driver, settings: Settings) -> SandboxDriver:
    if kind is Driver.DOCKER:
        # Drivers load on demand: a host installs only its own runtime's libraries.
        from workers.drivers.docker import DockerDriver  # noqa: PLC0415

        return DockerDriver(
            url=settings.docker_url, pull_timeout_seconds=settings.image_pull_timeout_seconds
        )
    raise typer.BadParameter(
        f"the {kind.value} driver is not part of this build yet", param_hint="--driver"
    )


def worker(
    driver: Annotated[
        Driver, typer.Option(help="Which runtime this worker drives.")
    ] = Driver.DOCKER,
    slots: Annotated[int, typer.Option(min=1, help="Jobs run at once (= the queue prefetch).")] = 1,
    drain_seconds: Annotated[
        float,
        typer.Option(
            help="On SIGTERM, seconds running jobs may finish before they are left to be adopted."
        ),
    ] = 30.0,
) -> None:
    """Run a worker: take jobs for DRIVER on this host, run them, report events."""
    settings = Settings()
    setup_logging(settings.log_level)

    async def serve() -> None:
        sandbox_driver = make_driver(driver, settings)
        try:
            async with Worker(
                settings, sandbox_driver, slots=slots, drain_seconds=drain_seconds
            ) as w:
                await w.serve_forever()
        finally:
            await sandbox_driver.aclose()

    asyncio.run(until_signalled(serve()))
