"""connect(): the first attempt is bounded and its failure is one FleetUnreachable that
names the URL with its password hidden and says why; nothing is left running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from sandfleet.common.amqp import connect, redacted_url
from sandfleet.common.errors import FleetUnreachable


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        ("amqps://u:p%40ss@broker.example:5671/v%2Fh", "amqps://u:***@broker.example:5671/v%2Fh"),
        ("amqp://u:a@b@host/", "amqp://u:***@host/"),
        ("amqp://u:@host/", "amqp://u:***@host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host/vhost", "amqp://host/vhost"),
    ],
)
def test_the_password_is_hidden(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_silent_broker_is_given_up_on_in_time(
    silent_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"amqp://u:pw-in-url@127.0.0.1:{silent_port}/"
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(5):
        with pytest.raises(FleetUnreachable) as raised:
            await connect(url, name="test", timeout=0.3)
    assert str(raised.value) == (
        f"cannot reach the fleet at amqp://u:***@127.0.0.1:{silent_port}/: "
        "no answer from the broker in time"
    )
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    # aio-pika's and aiormq's own account of the failure is not repeated in the logs
    assert not [r for r in caplog.records if r.name.startswith(("aiormq", "aio_pika"))]


async def test_a_refused_connection_says_so() -> None:
    with pytest.raises(FleetUnreachable) as raised:
        await connect("amqp://guest:secret@127.0.0.1:1/", name="test")
    assert (raised.value.url, raised.value.reason) == (
        "amqp://guest:***@127.0.0.1:1/",
        "Connection refused",
    )
    assert isinstance(raised.value, ConnectionError)  # retry-on-ConnectionError code retries
