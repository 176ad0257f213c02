"""The Docker/Podman job rules (block, image, resources), enforced by the worker, with
full field paths."""

from __future__ import annotations

from typing import Any

import pytest

from sandfleet.common.errors import RequestInvalid
from sandfleet.common.models import Job, JobTemplate, ResourceRequirements
from sandfleet.workers.drivers.cdi import parse_container_block
from sandfleet.workers.drivers.container_settings import ContainerLimits

LIMITS = ContainerLimits(max_cpu=4, max_memory=8 * 2**30)


def job(
    block: dict[str, Any],
    *,
    gpus: int | None = None,
    driver: str = "docker",
    image: str = "busybox",
    **resources: Any,
) -> Job:
    return Job(
        job_id="j1",
        driver=driver,
        resource_requirements=ResourceRequirements.model_validate(
            {"gpu": {"count": gpus}, **resources}
        ),
        template=JobTemplate(image=image, driver_config=block),
    )


def parse(block: dict[str, Any], **kwargs: Any) -> Any:
    return parse_container_block(job(block, **kwargs), LIMITS)


def errors(block: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(RequestInvalid) as caught:
        parse(block, **kwargs)
    return [(e.field, e.message) for e in caught.value.errors]


IDS = "template.driver_config.docker.gpu_device_ids"


def test_empty_block_is_valid() -> None:
    assert parse({}).gpu_device_ids == []


def test_cdi_names_by_index_and_uuid_are_valid() -> None:
    ids = ["nvidia.com/gpu=0", "nvidia.com/gpu=GPU-49431ef3-0f4f-2e8f-6567-eca72c1acedc"]
    assert parse({"gpu_device_ids": ids}, gpus=2).gpu_device_ids == ids


def test_unknown_keys_are_rejected() -> None:
    assert errors({"runtime": "nvidia"}) == [
        ("template.driver_config.docker.runtime", "Extra inputs are not permitted")
    ]


def test_ids_require_a_gpu_count() -> None:
    assert errors({"gpu_device_ids": ["nvidia.com/gpu=0"]}) == [
        (IDS, "GPU IDs require resource_requirements.gpu.count")
    ]


def test_duplicates_are_rejected() -> None:
    assert errors({"gpu_device_ids": ["nvidia.com/gpu=0", "nvidia.com/gpu=0"]}, gpus=2) == [
        (IDS, "duplicate IDs: ['nvidia.com/gpu=0']")
    ]


def test_unique_ids_must_match_the_count() -> None:
    assert errors({"gpu_device_ids": ["nvidia.com/gpu=0"]}, gpus=2) == [
        (IDS, "1 IDs given but resource_requirements.gpu.count is 2")
    ]


@pytest.mark.parametrize(
    "bad", ["0", "nvidia.com/gpu", "nvidia.com=0", "/gpu=0", "nvidia.com/gpu=0 "]
)
def test_ids_must_be_cdi_names(bad: str) -> None:
    [(field, message)] = errors({"gpu_device_ids": [bad]}, gpus=1)
    assert field == f"{IDS}.0"
    assert "is not a CDI device name" in message


def test_all_is_refused() -> None:
    [(field, message)] = errors({"gpu_device_ids": ["nvidia.com/gpu=all"]}, gpus=1)
    assert field == f"{IDS}.0"
    assert "names every device" in message


def test_ids_must_be_a_list_of_strings() -> None:
    assert errors({"gpu_device_ids": "nvidia.com/gpu=0"}, gpus=1)[0][0] == IDS


def test_podman_paths_name_the_podman_block() -> None:
    [(field, _)] = errors({"x": 1}, driver="podman")
    assert field == "template.driver_config.podman.x"


def test_an_image_that_is_no_reference_is_refused_before_any_runtime_call() -> None:
    # It would have made the worker GET the runtime's endless event stream.
    [(field, message)] = errors({}, image="x/../../events?")
    assert field == "template.image"
    assert "repository path component '..'" in message


@pytest.mark.parametrize(
    ("resources", "field", "reason"),
    # (Below the smallest share, or a giant number, the job model refuses already: every
    # job is a `Job`, so the gateway's bounds hold here too; see tests/unit/test_envelope.py.)
    [
        ({"cpu": "5"}, "cpu", "5 CPUs asked; containers on this host get at most 4"),
        ({"memory": "9Gi"}, "memory", "9663676416 bytes asked; containers on this host get at"),
    ],
)
def test_resources_beyond_the_hosts_limits_are_refused(
    resources: dict[str, Any], field: str, reason: str
) -> None:
    [(path, message)] = errors({}, **resources)
    assert path == f"resource_requirements.{field}"
    assert reason in message


def test_every_error_is_named_at_once() -> None:
    found = errors({"x": 1}, image="A", cpu=100, memory="9Gi")
    assert [field for field, _ in found] == [
        "template.image",
        "resource_requirements.cpu",
        "resource_requirements.memory",
        "template.driver_config.docker.x",
    ]


def test_resources_within_the_limits_are_accepted() -> None:
    assert parse({}, cpu=0.01, memory="6Mi").gpu_device_ids == []
    assert parse({}, cpu=4, memory="8Gi").gpu_device_ids == []
