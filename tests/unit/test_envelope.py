"""The gateway's envelope rules, each with the exact field path of its error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandfleet.common.errors import (
    MAX_REPORTED_ERRORS,
    FieldError,
    MessageUndecodable,
    RequestInvalid,
    bounded_errors,
)
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import ReplyStatus, SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.gateway.envelope import admit, decode, job_id_hint
from tests.support.fuzz_inputs import hostile_request

SETTINGS = Settings(host="gw", max_driver_config_bytes=256)


def body(**fields: Any) -> bytes:
    request: dict[str, Any] = {"template": {"image": "busybox"}}
    for key, value in fields.items():
        if key.startswith("template_"):
            request["template"][key.removeprefix("template_")] = value
        else:
            request[key] = value
    return json.dumps(request).encode()


def errors_of(raw: bytes, settings: Settings = SETTINGS) -> list[tuple[str, str]]:
    with pytest.raises(RequestInvalid) as caught:
        admit(raw, settings)
    return [(e.field, e.message) for e in caught.value.errors]


def test_minimal_request_gets_default_driver_and_generated_job_id() -> None:
    job = admit(body(), SETTINGS)
    assert job.driver == "docker"
    assert job.job_id.startswith("job-")
    assert job.template.driver_config == {}
    podman_default = SETTINGS.model_copy(update={"default_driver": "podman"})
    assert admit(body(), podman_default).driver == "podman"


def test_only_the_active_drivers_inner_object_is_forwarded() -> None:
    raw = body(
        driver="podman",
        template_driver_config={
            "podman": {"gpu_device_ids": ["nvidia.com/gpu=0"], "anything": [1, 2]},
            "docker": "malformed and ignored",
            "vm": 42,
            "someday": None,
        },
    )
    job = admit(raw, SETTINGS)
    assert job.template.driver_config == {
        "gpu_device_ids": ["nvidia.com/gpu=0"],
        "anything": [1, 2],
    }
    assert "docker" not in job.model_dump_json()


@pytest.mark.parametrize(
    ("block", "kind"),
    [([], "an array"), ("x", "a string"), (3, "a number"), (None, "null"), (True, "a boolean")],
)
def test_active_block_must_be_an_object(block: object, kind: str) -> None:
    assert errors_of(body(template_driver_config={"docker": block})) == [
        ("template.driver_config.docker", f"must be a JSON object, not {kind}")
    ]


def test_driver_config_size_is_capped() -> None:
    raw = body(template_driver_config={"vm": {"pad": "x" * 300}})
    [(field, message)] = errors_of(raw)
    assert field == "template.driver_config"
    assert "limit is 256" in message


def test_gpu_count_must_be_positive_and_an_integer() -> None:
    assert errors_of(body(resource_requirements={"gpu": {"count": 0}}))[0][0] == (
        "resource_requirements.gpu.count"
    )
    assert errors_of(body(resource_requirements={"gpu": {"count": "1"}}))[0][0] == (
        "resource_requirements.gpu.count"
    )
    job = admit(body(resource_requirements={"gpu": {"count": 2}}), SETTINGS)
    assert job.resource_requirements.gpu_count == 2


def test_every_error_is_reported_with_its_path() -> None:
    raw = body(
        driver="Kube.Net",  # not a driver name (k8s would be one, checked by its route)
        job_id="has space",
        placement={"host": "a.b"},
        colour="blue",
        labels={"sandfleet.job_id": "x"},
        template_image="",
        template_environment={"1BAD": "v"},
        template_timeout_seconds=0,
    )
    fields = {field for field, _ in errors_of(raw)}
    assert fields == {
        "driver",
        "job_id",
        "placement.host",
        "colour",
        "labels",
        "template.image",
        "template.environment.1BAD.[key]",
        "template.timeout_seconds",
    }


def test_reserved_label_message_names_the_keys() -> None:
    [(field, message)] = errors_of(body(template_labels={"sandfleet.gpus": "0"}))
    assert field == "template.labels"
    assert "reserved" in message and "sandfleet.gpus" in message


def test_quantities_are_normalised() -> None:
    job = admit(body(resource_requirements={"cpu": "500m", "memory": "4Gi"}), SETTINGS)
    assert job.resource_requirements.cpu == 0.5
    assert job.resource_requirements.memory == 4 * 2**30
    [(field, _)] = errors_of(body(resource_requirements={"memory": "lots"}))
    assert field == "resource_requirements.memory"


def test_non_object_request() -> None:
    assert errors_of(b"[1, 2]") == [("request", "Input should be an object")]


def test_decode_refuses_non_json_and_oversized_bodies() -> None:
    with pytest.raises(MessageUndecodable, match="not JSON"):
        decode(b"\xff{", max_bytes=100)
    with pytest.raises(MessageUndecodable, match="limit is 10"):
        decode(b"[" + b"1," * 20 + b"1]", max_bytes=10)
    assert decode(b'{"a": 1}', max_bytes=100) == {"a": 1}


def test_job_id_hint_only_trusts_plausible_ids() -> None:
    assert job_id_hint({"job_id": "abc"}) == "abc"
    assert job_id_hint({"job_id": 5}) is None
    assert job_id_hint({"job_id": "x" * 64}) is None
    assert job_id_hint([]) is None


@pytest.mark.parametrize("job_id", ["\ud800", "has space", "-lead", "a\n", ""])
def test_job_id_hint_refuses_ids_off_the_pattern(job_id: str) -> None:
    # A lone surrogate (json.loads reads one, pydantic's parser does not) cannot be
    # written into the rejected event: the gateway requeued such a message forever.
    assert job_id_hint(decode(json.dumps({"job_id": job_id}).encode(), max_bytes=100)) is None


def test_timeout_is_bounded_by_the_setting() -> None:
    week = SETTINGS.max_timeout_seconds
    assert week == 7 * 86400
    assert admit(body(template_timeout_seconds=week), SETTINGS).template.timeout_seconds == week
    assert errors_of(body(template_timeout_seconds=week + 1)) == [
        (
            "template.timeout_seconds",
            "must be at most 604800 seconds (SANDFLEET_MAX_TIMEOUT_SECONDS)",
        )
    ]
    hour = SETTINGS.model_copy(update={"max_timeout_seconds": 3600})
    [(field, message)] = errors_of(body(template_timeout_seconds=3601), hour)
    assert field == "template.timeout_seconds" and "at most 3600 seconds" in message


def test_a_timeout_over_the_limit_is_reported_with_the_other_errors() -> None:
    fields = {f for f, _ in errors_of(body(template_timeout_seconds=10**30, job_id="a b"))}
    assert fields == {"template.timeout_seconds", "job_id"}


GIANT = "9" * 5000


@pytest.mark.parametrize(
    "raw",
    [
        f'{{"template": {{"image": "x"}}, "x": {GIANT}}}',
        f'{{"template": {{"image": "x"}}, "resource_requirements": {{"memory": {GIANT}}}}}',
        f'{{"template": {{"image": "x", "timeout_seconds": -{GIANT}}}}}',
        f'{{"template": {{"image": "x", "driver_config": {{"docker": {{"n": [{GIANT}]}}}}}}}}',
    ],
)
def test_giant_integers_anywhere_are_refused_cleanly(raw: str) -> None:
    # Before: json.loads raised a bare ValueError (the int-from-text limit), which
    # escaped decode: the message was redelivered, with no reply and no event.
    with pytest.raises(MessageUndecodable, match=r"^a number has more than 4300 digits$"):
        decode(raw.encode(), max_bytes=1 << 20)
    [(field, message)] = errors_of(raw.encode())
    assert field == "request" and "number out of range" in message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    raw = f'{{"template": {{"image": "x", "driver_config": {{"docker": {{"f": {constant}}}}}}}}}'
    with pytest.raises(MessageUndecodable, match=f"{constant} is not a JSON number"):
        decode(raw.encode(), max_bytes=1 << 20)
    # admit on its own (pydantic reads NaN) refuses it too, rather than forward a null.
    [(field, message)] = errors_of(raw.encode())
    assert field == "template.driver_config" and "NaN, Infinity" in message


def test_a_number_beyond_a_float_in_a_driver_block_is_refused() -> None:
    [(field, _)] = errors_of(
        body(template_driver_config={"vm": {"x": 1}}).replace(b"1}", b"1e400}")
    )
    assert field == "template.driver_config"


@pytest.mark.parametrize(
    ("memory", "fragment"),
    [
        ("1e400Gi", "not a memory quantity"),
        ("9" * 400 + "Gi", "out of range"),
        ("1" + "0" * 100_000, "out of range"),
        (1e308, "valid integer"),
        (1024, "between 6Mi and 16Ti"),
        ("1Mi", "out of range"),
        ("17Ti", "out of range"),
        (16 * 2**40 + 1, "between 6Mi and 16Ti"),
    ],
)
def test_memory_is_bounded(memory: object, fragment: str) -> None:
    # Before: "9"*400 + "Gi" raised OverflowError from int(inf) out of admit.
    [(field, message)] = errors_of(body(resource_requirements={"memory": memory}))
    assert field == "resource_requirements.memory"
    assert fragment in message
    assert len(message) < 300


@pytest.mark.parametrize("cpu", [1e-10, 0.001, 0, 1024.5, 1e308, "5m", "1025", "1e-10"])
def test_cpu_is_bounded(cpu: object) -> None:
    # Before: 1e-10 was accepted, and a runtime reads a quota that rounds to 0 as unlimited.
    [(field, message)] = errors_of(body(resource_requirements={"cpu": cpu}))
    assert field == "resource_requirements.cpu"
    assert "between 0.01 (10m) and 1024 cores" in message or "not a CPU quantity" in message


def test_the_bounds_themselves_are_accepted() -> None:
    for cpu, memory in [(0.01, "6Mi"), ("10m", 6 * 2**20), (1024, "16Ti"), ("1024", 16 * 2**40)]:
        job = admit(body(resource_requirements={"cpu": cpu, "memory": memory}), SETTINGS)
        assert job.resource_requirements.cpu in {0.01, 1024}
        assert job.resource_requirements.memory in {6 * 2**20, 16 * 2**40}


def test_a_huge_invalid_request_gets_a_small_rejection() -> None:
    raw = hostile_request()
    assert len(raw) == 1 << 20
    with pytest.raises(RequestInvalid) as caught:
        admit(raw, SETTINGS)
    errors = caught.value.errors
    assert 1 < len(errors) <= MAX_REPORTED_ERRORS
    assert errors[-1].field == "request"
    assert errors[-1].message.endswith("more errors not shown")
    assert len(str(caught.value)) < 4096  # the log line of a dead-lettered message too
    # What the gateway's _reject sends, built the same way (the broker test sends it).
    summary = "; ".join(str(e) for e in errors)
    event = Event(job_id="j", phase=Phase.REJECTED, message=summary, host="h", errors=errors)
    reply = SubmitReply(status=ReplyStatus.REJECTED, job_id="j", errors=errors)
    assert len(event.model_dump_json()) < 8192
    assert len(reply.model_dump_json()) < 4096


def test_bounded_errors_cuts_fields_and_messages_and_keeps_short_lists_whole() -> None:
    short = [FieldError(field="a", message="b")] * 3
    assert bounded_errors(short) == short
    long = [FieldError(field="f" * 10_000, message="\x00" * 10_000)] * 50
    bounded = bounded_errors(long)
    assert 1 < len(bounded) <= MAX_REPORTED_ERRORS
    assert all(len(e.field) <= 160 and len(e.message) <= 240 for e in bounded)
    assert bounded[-1] == FieldError(
        field="request", message=f"{50 - len(bounded) + 1} more errors not shown"
    )
    reply = SubmitReply(status=ReplyStatus.REJECTED, job_id="j", errors=bounded)
    assert len(reply.model_dump_json()) < 4096
    assert bounded_errors(bounded) == bounded  # every step on the way may apply it
