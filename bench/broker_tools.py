"""What the benches share about the broker: throwaway vhosts, windowed publishing, event
messages made from serialized templates, and the broker's version.

A throwaway vhost keeps a bench's queues and logs apart from anything else on the
broker, and deleting it removes them all at once.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aio_pika

# The event id an event template is serialized with, replaced by a fresh one per message.
EVENT_ID_MARK = "0" * 31 + "e"


def templated_event(template: str, event_id: str, **marks: str) -> aio_pika.Message:
    """An event message from `template` (an Event serialized once, with EVENT_ID_MARK and
    each of `marks` in it), as EventPublisher sends one: pydantic per message would make
    the bench's publisher, not what it feeds, the bottleneck."""
    body = template.replace(EVENT_ID_MARK, event_id)
    for mark, value in marks.items():
        body = body.replace(mark, value)
    return aio_pika.Message(
        body.encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
        type="sandfleet.event",
    )


async def windowed(n: int, window: int, send: Callable[[int], Awaitable[object]]) -> None:
    """Run send(0..n-1) with at most `window` in flight: `window` senders share one
    counter, so a million sends make `window` tasks, not a million."""
    indices = iter(range(n))

    async def sender() -> None:
        for i in indices:
            await send(i)

    await asyncio.gather(*(sender() for _ in range(max(1, min(window, n)))))


def throwaway_vhost(base_url: str) -> tuple[str, Callable[[], None]]:
    """(the URL of a new vhost, a function deleting it); the base URL and a no-op when
    the local rabbitmqctl cannot make one."""
    vhost = f"sandfleet-bench-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return base_url, lambda: None
    url = base_url.rstrip("/") + "/" + vhost

    def cleanup() -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False)

    return url, cleanup


@asynccontextmanager
async def vhost(base_url: str) -> AsyncIterator[str]:
    """A throwaway vhost's URL, deleted on the way out (interrupted or not)."""
    url, cleanup = await asyncio.to_thread(throwaway_vhost, base_url)
    try:
        yield url
    finally:
        await asyncio.to_thread(cleanup)


async def broker_version(url: str) -> str:
    """`RabbitMQ 3.x.y`, as the broker announces itself to a client."""
    connection = await aio_pika.connect(url)
    async with connection:
        assert connection.transport is not None
        properties = connection.transport.connection.server_properties
        product, version = properties.get("product", "?"), properties.get("version", "?")
    return f"{product!s} {version!s}"
