"""The gateway's envelope rules, each with the exact field path of its error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sandfleet.common.errors import MessageUndecodable, RequestInvalid
from sandfleet.common.settings import Settings
from sandfleet.gateway.envelope import admit, decode, job_id_hint

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
