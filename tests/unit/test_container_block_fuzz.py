"""Property tests over the Docker/Podman job check (both drivers' `parse_config`): any
block, image and resources either pass with every invariant holding, or are refused
with RequestInvalid naming fields; nothing else is ever raised."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from sandfleet.common.errors import RequestInvalid
from sandfleet.common.image_ref import parse_image_reference
from sandfleet.common.models import Job
from sandfleet.workers.drivers.cdi import ContainerBlock, parse_container_block
from sandfleet.workers.drivers.container_settings import MIN_CPU, MIN_MEMORY, ContainerLimits

LIMITS = ContainerLimits(max_cpu=8, max_memory=16 * 2**30)
CDI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*=[A-Za-z0-9_.:-]+")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
cdi_names = st.from_regex(r"[a-z]{1,4}\.[a-z]{2,3}/gpu=([0-9]|all|GPU-[a-f0-9]{4})", fullmatch=True)
device_ids = st.lists(cdi_names | st.text(max_size=16), max_size=4)
blocks = st.dictionaries(
    st.sampled_from(["gpu_device_ids", "runtime", "privileged"]) | st.text(max_size=8),
    device_ids | json_values,
    max_size=3,
)
images = st.sampled_from(
    ["busybox", "sandfleet-test/busybox:latest", "x/../../events?", "A", "r@sha256:" + "a" * 64]
) | st.text(max_size=40)
cpus = st.none() | st.floats(min_value=1e-12, max_value=1024) | st.sampled_from(["500m", "2"])
memories = (
    st.none()
    | st.integers(min_value=1, max_value=2**70)
    | st.integers(min_value=MIN_MEMORY, max_value=LIMITS.max_memory)
    | st.sampled_from(["64Mi", "1Ki"])
)


@st.composite
def gpu_blocks(draw: st.DrawFn) -> tuple[dict[str, Any], int | None]:
    """A block and a GPU count: as often matching (n unique IDs, count n) as not."""
    if draw(st.booleans()):
        return draw(blocks), draw(st.none() | st.integers(1, 4))
    count = draw(st.integers(1, 4))
    ids = draw(st.lists(cdi_names, min_size=count, max_size=count, unique=True))
    return {"gpu_device_ids": ids}, count


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    block, count = draw(gpu_blocks())
    resources: dict[str, Any] = {
        "cpu": draw(cpus),
        "memory": draw(memories),
        "gpu": {"count": count},
    }
    try:
        return Job.model_validate(
            {
                "job_id": "j1",
                "driver": draw(st.sampled_from(["docker", "podman"])),
                "resource_requirements": resources,
                "template": {"image": draw(images), "driver_config": block},
            }
        )
    except ValidationError:  # the gateway's envelope rules refuse it before any worker
        assume(False)
        raise


@given(jobs())
def test_a_job_is_accepted_whole_or_refused_by_field(job: Job) -> None:
    try:
        block = parse_container_block(job, LIMITS)
    except RequestInvalid as refused:
        assert refused.errors
        prefixes = (
            "template.image",
            "resource_requirements.",
            f"template.driver_config.{job.driver}",
        )
        assert all(error.field.startswith(prefixes) and error.message for error in refused.errors)
        return
    assert_accepted_job_holds(job, block)


def assert_accepted_job_holds(job: Job, block: ContainerBlock) -> None:
    assert set(job.template.driver_config) <= {"gpu_device_ids"}
    parse_image_reference(job.template.image)  # raises if it is no reference
    ids, count = block.gpu_device_ids, job.resource_requirements.gpu_count
    assert not ids or (len(set(ids)) == len(ids) == count)
    assert all(CDI_NAME.fullmatch(i) and not i.endswith("=all") for i in ids)
    cpu, memory = job.resource_requirements.cpu, job.resource_requirements.memory
    assert cpu is None or MIN_CPU <= cpu <= LIMITS.max_cpu
    assert memory is None or MIN_MEMORY <= memory <= LIMITS.max_memory
