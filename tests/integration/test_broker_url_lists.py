"""A URL list against the real broker: the first node that answers serves, and a
list where none answers says why for each."""

from __future__ import annotations

import pytest

import sandfleet
from sandfleet.common.amqp import connect
from sandfleet.common.errors import FleetUnreachable
from sandfleet.gateway.service import Gateway

pytestmark = pytest.mark.integration

NOBODY = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1


async def test_the_first_node_that_answers_serves(broker_url: str, gateway: Gateway) -> None:
    vhost = broker_url.rsplit("/", 1)[1]
    urls = f"{NOBODY}{vhost},{broker_url}"
    async with sandfleet.Client(urls) as client:
        reply = await client.submit({"job_id": "l-1", "template": {"image": "x"}})
    assert reply.errors[0].field == "driver"  # answered by the gateway: no worker here
    assert client.url.count("guest:***@") == 2


async def test_no_node_answering_names_each_node_and_why() -> None:
    urls = f"{NOBODY},amqp://guest:guest@127.0.0.1:2/"
    with pytest.raises(FleetUnreachable) as raised:
        await connect(urls, name="test", timeout=5)
    text = str(raised.value)
    assert "127.0.0.1:1: " in text and "127.0.0.1:2: " in text
    assert "refused" in text.lower()
    assert "guest:***@" in text and ":guest@" not in text
