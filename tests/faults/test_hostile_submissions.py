"""Hostile submissions through a real gateway: each is answered `rejected`, with its field
path, as an event and a reply, and dead-lettered once; none is requeued as poison, and
none makes an answer bigger than a few KiB."""

from __future__ import annotations

import json

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from tests.support import until_terminal
from tests.support.broker import dead_letters, raw_submit
from tests.support.fuzz_inputs import hostile_request

pytestmark = pytest.mark.integration

GIANT = "9" * 5000


async def test_poison_numbers_are_rejected_with_their_field_paths(
    settings: Settings, client: Client
) -> None:
    # Before: the giant integer escaped decode as a bare ValueError and the enormous memory
    # escaped admit as an OverflowError: the message was requeued to the delivery limit,
    # with no reply and no event; the huge timeout was accepted.
    cases = [
        ('"x": ' + GIANT, "MalformedMessage", "request", "a number has more than 4300 digits"),
        (
            f'"resource_requirements": {{"memory": "{GIANT}Gi"}}',
            "InvalidRequest",
            "resource_requirements.memory",
            "out of range: memory must be between 6Mi and 16Ti",
        ),
        (
            '"resource_requirements": {"cpu": 1e-10}',
            "InvalidRequest",
            "resource_requirements.cpu",
            "must be between 0.01 (10m) and 1024 cores",
        ),
        (
            f'"resource_requirements": {{"gpu": {{"count": 1}}}}, '
            f'"labels": {{"t": "{GIANT[:1000]}"}}, '
            f'"template": {{"image": "x", "timeout_seconds": {10**12}}}',
            "InvalidRequest",
            "template.timeout_seconds",
            "must be at most 604800 seconds (SANDFLEET_MAX_TIMEOUT_SECONDS)",
        ),
    ]
    bodies = []
    for n, (fields, reason, field, fragment) in enumerate(cases):
        template = "" if "template" in fields else ', "template": {"image": "x"}'
        body = f'{{"job_id": "poison-{n}", {fields}{template}}}'.encode()
        bodies.append(body)
        async with client.events(phases={Phase.REJECTED}) as stream:
            reply = await raw_submit(settings.broker_url, body)
            # The job_id of an undecodable body is unknown: the gateway names a new one.
            [event] = await until_terminal(stream, str(reply["job_id"]))
        assert reply["status"] == "rejected"
        errors = reply["errors"]
        assert isinstance(errors, list) and len(errors) == 1
        error: dict[str, str] = errors[0]
        assert error["field"] == field and fragment in error["message"]
        assert (event.phase, event.reason) == (Phase.REJECTED, reason)
        assert [(e.field, e.message) for e in event.errors] == [(field, error["message"])]
    assert await dead_letters(settings.broker_url) == bodies


async def test_a_1_mib_invalid_request_gets_a_small_rejection(
    settings: Settings, client: Client
) -> None:
    # Before: this request's rejected event was some 27 MB (160,000 errors, each twice:
    # once more in the summary); about 40 of them pushed a 1 GiB event log out.
    body = hostile_request(settings.max_message_bytes, job_id="amplifier")
    async with client.events(job_id="amplifier") as stream:
        reply = await raw_submit(settings.broker_url, body)
        [event] = await until_terminal(stream, "amplifier")
    assert event.reason == "InvalidRequest"
    assert len(event.model_dump_json()) < 8 << 10
    assert len(json.dumps(reply)) < 4 << 10
    assert event.errors[-1].field == "request"
    assert event.errors[-1].message.endswith("more errors not shown")
    assert len(await dead_letters(settings.broker_url)) == 1
