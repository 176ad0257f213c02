"""Parsing a driver's block: strict, every error named by its full path.

For any driver, built in or not: `parse_block(MyBlock, job)` validates
`template.driver_config.<driver>` against a pydantic model and applies DESIGN's rules
for `gpu_device_ids`, which every driver's block carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from sandfleet.common.errors import FieldError, RequestInvalid
from sandfleet.common.models import Job, field_errors

B = TypeVar("B", bound=BaseModel)


def block_path(job: Job) -> str:
    return f"template.driver_config.{job.driver}"


def parse_block(model: type[B], job: Job, *, errors: Sequence[FieldError] = ()) -> B:
    """The job's block as `model`; RequestInvalid with `errors` and every error found.

    `model` should forbid unknown keys and be strict (`ConfigDict(extra="forbid",
    strict=True)`), and have a `gpu_device_ids` list.
    """
    prefix = block_path(job)
    try:
        block = model.model_validate(job.template.driver_config)
    except ValidationError as exc:
        raise RequestInvalid([*errors, *field_errors(exc, prefix=prefix)]) from exc
    ids: list[str] = getattr(block, "gpu_device_ids", [])
    gpu_count = job.resource_requirements.gpu_count
    found = [*errors, *gpu_id_errors(ids, gpu_count, path=f"{prefix}.gpu_device_ids")]
    if found:
        raise RequestInvalid(found)
    return block


def gpu_id_errors(ids: Sequence[str], gpu_count: int, *, path: str) -> list[FieldError]:
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
