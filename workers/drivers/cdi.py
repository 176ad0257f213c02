"""Rules for a container driver's block (Docker, Podman): GPUs named by CDI device names.

Shared by the container drivers; it is not a driver itself.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from sandfleet.common.errors import FieldError, RequestInvalid
from sandfleet.common.models import Job, field_errors

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


def gpu_id_errors(ids: list[str], gpu_count: int, *, path: str) -> list[FieldError]:
    """DESIGN's GPU-ID rules, the same for every driver; `path` names the list."""
    if not ids:
        return []
    if gpu_count == 0:
        message = "GPU IDs require resource_requirements.gpu.count"
        return [FieldError(field=path, message=message)]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        return [FieldError(field=path, message=f"duplicate IDs: {duplicates}")]
    if len(ids) != gpu_count:
        message = f"{len(ids)} IDs given but resource_requirements.gpu.count is {gpu_count}"
        return [FieldError(field=path, message=message)]
    return []


def parse_container_block(job: Job) -> ContainerBlock:
    prefix = f"template.driver_config.{job.driver}"
    try:
        block = ContainerBlock.model_validate(job.template.driver_config)
    except ValidationError as exc:
        raise RequestInvalid(field_errors(exc, prefix=prefix)) from exc
    errors = gpu_id_errors(
        block.gpu_device_ids,
        job.resource_requirements.gpu_count,
        path=f"{prefix}.gpu_device_ids",
    )
    if errors:
        raise RequestInvalid(errors)
    return block
