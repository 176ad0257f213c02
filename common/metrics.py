"""`/metrics` (Prometheus) and `/healthz` over HTTP, for the gateway and the workers.

    server = MetricsServer(registry, healthy=lambda: gateway.healthy, before_scrape=refresh)
    await server.start("127.0.0.1", 9464)
    ...
    await server.stop()

Each process keeps its metrics in a registry of its own, never prometheus-client's
global one, so that several gateways and workers can run in one process (the tests).
`/healthz` answers 200 while the process is consuming, 503 otherwise (its broker
connection is down, it is starting or stopping): what a compose or Kubernetes health
check asks. The server binds to 127.0.0.1 unless told otherwise, since the metrics
name jobs (a GPU's holder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import typer
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sandfleet.common.errors import SandfleetError
from sandfleet.common.settings import Settings

log = logging.getLogger(__name__)

MetricsPort = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=65535,
        help="Serve /metrics and /healthz on this port (default: SANDFLEET_METRICS_PORT; "
        "none: off), on SANDFLEET_METRICS_ADDRESS (default 127.0.0.1).",
    ),
]

# How long a scrape waits for `before_scrape` (a broker round trip) before it answers
# with the values it has.
REFRESH_TIMEOUT_SECONDS = 5.0


class MetricsUnavailable(SandfleetError):
    """The metrics server cannot listen where it was told to (exit 78: misconfigured)."""


def connection_up(connection: AbstractRobustConnection | None) -> bool:
    """Whether the robust connection is connected now, not reconnecting or closed."""
    return connection is not None and not connection.is_closed and connection.connected.is_set()


def consuming_on(
    connection: AbstractRobustConnection | None, channel: AbstractChannel | None
) -> bool:
    """Whether `channel`, the one a process consumes its work on, is open on a connection
    that is up. The connection counts as up again before its channels are restored (and
    a restore can fail and wait for the next try): until then no work arrives."""
    return connection_up(connection) and channel is not None and not channel.is_closed


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        healthy: Callable[[], bool],
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = registry
        self._healthy = healthy
        self._before_scrape = before_scrape
        self._runner: web.AppRunner | None = None
        self.port: int | None = None  # the port bound (the one chosen, for port 0)

    async def start(self, address: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, address, port)
        try:
            await site.start()
        except OSError as exc:  # the port taken, an address not this machine's
            await self.stop()
            raise MetricsUnavailable(
                f"SANDFLEET_METRICS_ADDRESS/SANDFLEET_METRICS_PORT (--metrics-port): cannot "
                f"listen on {address}:{port}: {exc.strerror or exc}"
            ) from None
        self.port = self._runner.addresses[0][1]
        log.info("metrics on http://%s:%d/metrics, health on /healthz", address, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                    await self._before_scrape()
            except Exception:  # a broker outage: the last values are still worth reading
                log.warning("refreshing metrics before a scrape failed", exc_info=True)
        # Collectors read state files (GPU claims): off the event loop.
        body = await asyncio.to_thread(generate_latest, self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        if self._healthy():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not consuming\n")


@contextlib.asynccontextmanager
async def metrics_served(
    registry: CollectorRegistry,
    settings: Settings,
    *,
    healthy: Callable[[], bool],
    before_scrape: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[MetricsServer | None]:
    """A server for as long as the block runs, on SANDFLEET_METRICS_ADDRESS and
    SANDFLEET_METRICS_PORT; None when no port is set (metrics off)."""
    if settings.metrics_port is None:
        yield None
        return
    server = MetricsServer(registry, healthy=healthy, before_scrape=before_scrape)
    await server.start(settings.metrics_address, settings.metrics_port)
    try:
        yield server
    finally:
        await server.stop()
