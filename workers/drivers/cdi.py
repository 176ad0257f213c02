"""What a container driver (Docker, Podman) checks in a job: its block (GPUs named by
CDI device names), its image reference, and its cpu and memory against the host's limits.

Shared by the container drivers; it is not a driver itself.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sandfleet.common.errors import FieldError, ImageUnavailable
from sandfleet.common.image_ref import parse_image_reference
from sandfleet.common.models import Job
from sandfleet.workers.drivers.blocks import parse_block
from sandfleet.workers.drivers.container_settings import ContainerLimits

# vendor/class=name, as the CDI spec defines the parts
_CDI_NAME = re.compile(
    r"^(?P<vendor>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
    r"/(?P<class>[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?)"
    r"=(?P<name>[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?)$"
)


def _cdi_name(value: str) -> str:
    match = _CDI_NAME.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a CDI device name (vendor/class=name, e.g. nvidia.com/gpu=0)"
        )
    if match["name"] == "all":
        raise ValueError(f"{value!r} names every device; name single GPUs so they can be claimed")
    return value


CdiName = Annotated[str, AfterValidator(_cdi_name)]


class ContainerBlock(BaseModel):
    """The `docker` / `podman` block."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    gpu_device_ids: list[CdiName] = Field(default_factory=list, max_length=64)


def parse_container_block(job: Job, limits: ContainerLimits) -> ContainerBlock:
    """The job's block; RequestInvalid naming every error, the image's and the
    resources' among them (`template.image`, `resource_requirements.cpu`)."""
    return parse_block(
        ContainerBlock, job, errors=[*image_errors(job), *limits.errors(job.resource_requirements)]
    )


def image_errors(job: Job) -> list[FieldError]:
    """`template.image` and why, if the image is no OCI reference (common/image_ref.py)."""
    try:
        parse_image_reference(job.template.image)
    except ValueError as exc:
        return [FieldError(field="template.image", message=str(exc))]
    return []


def checked_image(image: str) -> str:
    """`image`, if it is a reference. A driver asks before its runtime sees the name:
    a job must not reach a runtime's API with any other, checked by the worker or not."""
    try:
        parse_image_reference(image)
    except ValueError as exc:
        raise ImageUnavailable(f"image {image!r} is no image reference: {exc}") from exc
    return image
