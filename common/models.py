"""The request a submitter sends, the job a worker receives, and the gateway's reply.

The request carries a driver-keyed ``template.driver_config`` envelope; the gateway
never reads inside a driver's block. The job a worker receives holds only its own
driver's inner object, still unvalidated: each driver owns the parsing of its block.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from sandfleet.common.errors import FieldError
from sandfleet.common.events import Phase
from sandfleet.common.quantities import cpu_cores, cpu_in_range, memory_bytes, memory_in_range
from sandfleet.common.signing import Signature

# A driver is named, not enumerated: any installed driver package may register a name
# (entry-point group `sandfleet.drivers`). Names become routing-key words, queue-name parts
# and `SANDFLEET_<NAME>_*` settings prefixes, so: lower-case letters, digits, underscores.
DRIVER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
DriverName = Annotated[str, StringConstraints(pattern=DRIVER_NAME_PATTERN)]

RESERVED_LABEL_PREFIX = "sandfleet."

# The validation-context key under which the gateway passes its SANDFLEET_MAX_TIMEOUT_SECONDS:
# the limit is a setting, so a static Field bound cannot hold it.
MAX_TIMEOUT_CONTEXT = "max_timeout_seconds"

# job ids become container/domain names (`sandfleet-<job_id>`) and routing-key parts
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
# host names become routing-key words, so no dots (topic patterns split on them)
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
HostName = Annotated[str, StringConstraints(pattern=HOST_NAME_PATTERN)]
# A broker login (the AMQP user_id the broker checked): RabbitMQ allows almost any text.
Submitter = Annotated[str, StringConstraints(min_length=1, max_length=255)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]


def _no_reserved_labels(labels: dict[str, str]) -> dict[str, str]:
    reserved = sorted(k for k in labels if k.startswith(RESERVED_LABEL_PREFIX))
    if reserved:
        raise ValueError(
            f"label keys starting with {RESERVED_LABEL_PREFIX!r} are reserved: {reserved}"
        )
    return labels


# Labels travel in events and the gateways' job views: bounded, so no request makes every
# listing of jobs huge.
MAX_LABELS = 64
Labels = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=256)],
        Annotated[str, StringConstraints(max_length=1024)],
    ],
    Field(max_length=MAX_LABELS),
    AfterValidator(_no_reserved_labels),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# A MIG profile as NVML names it (3g.40gb, 1g.10gb+me, 1c.3g.40gb); the same pattern as
# sandfleet.workers.gpu.inventory.MIG_PROFILE_PATTERN.
MIG_PROFILE_PATTERN = r"^(?:[1-9]c\.)?[1-9]g\.[1-9][0-9]{0,3}gb(?:\+[a-z]{1,8})?$"


class GpuRequirement(_Strict):
    count: Annotated[int, Field(gt=0, le=64)] | None = None
    # `count` MIG instances of this profile instead of whole GPUs; without it a count-only
    # request never gets a MIG instance.
    mig_profile: (
        Annotated[str, StringConstraints(max_length=32, pattern=MIG_PROFILE_PATTERN)] | None
    ) = None

    @model_validator(mode="after")
    def _mig_needs_a_count(self) -> GpuRequirement:
        if self.mig_profile is not None and self.count is None:
            # At `count`, the field to fill in: a ValueError here would name the model.
            message = "mig_profile needs count (how many instances)"
            error = PydanticCustomError("value_error", message)
            raise ValidationError.from_exception_data(
                type(self).__name__, [InitErrorDetails(type=error, loc=("count",), input=None)]
            )
        return self


# Quantities within what the runtimes honour; a request may spell them "500m", "4Gi", …
CpuCores = Annotated[
    float,
    BeforeValidator(cpu_cores),
    AfterValidator(cpu_in_range),
    Field(description="cores, 0.01 to 1024; the request may say 500m"),
]
MemoryBytes = Annotated[
    int,
    BeforeValidator(memory_bytes),
    AfterValidator(memory_in_range),
    Field(description="bytes, 6Mi to 16Ti; the request may say 512Mi, 4Gi, …"),
]


class ResourceRequirements(_Strict):
    cpu: CpuCores | None = None
    memory: MemoryBytes | None = None
    gpu: GpuRequirement = GpuRequirement()

    @property
    def gpu_count(self) -> int:
        return self.gpu.count or 0


class Placement(_Strict):
    host: HostName | None = None


class _TemplateBase(_Strict):
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    command: list[str] = Field(default_factory=list, max_length=1024)
    environment: dict[EnvName, str] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    timeout_seconds: Annotated[int, Field(gt=0)] | None = None

    @field_validator("timeout_seconds")
    @classmethod
    def _within_the_fleet_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get(MAX_TIMEOUT_CONTEXT)
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"must be at most {limit} seconds (SANDFLEET_MAX_TIMEOUT_SECONDS)")
        return value


class Template(_TemplateBase):
    """The request's template: ``driver_config`` is keyed by driver name."""

    driver_config: dict[str, Any] = Field(default_factory=dict)


class JobTemplate(_TemplateBase):
    """The job's template: ``driver_config`` is the active driver's inner object only."""

    driver_config: dict[str, Any] = Field(default_factory=dict)


class SandboxRequest(_Strict):
    job_id: JobId | None = None
    driver: DriverName | None = None
    placement: Placement = Placement()
    labels: Labels = Field(default_factory=dict)
    resource_requirements: ResourceRequirements = ResourceRequirements()
    template: Template


class Job(_Strict):
    """What a worker receives: a validated request bound to one driver."""

    job_id: JobId
    driver: DriverName
    placement: Placement = Placement()
    labels: Labels = Field(default_factory=dict)
    resource_requirements: ResourceRequirements = ResourceRequirements()
    template: JobTemplate
    submitted_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # The submitter's broker login, as the broker validated it (the AMQP user_id).
    submitted_by: Submitter | None = None
    # The gateway's signature over the rest (sandfleet.common.signing); workers verify it.
    signature: Signature | None = None


class ReplyStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class SubmitReply(_Strict):
    status: ReplyStatus
    job_id: str
    errors: list[FieldError] = Field(default_factory=list)
    # Only when the job_id was already submitted (nothing new runs): `phase` is where
    # the existing job stands. Left out of ordinary replies, which keep DESIGN's shape.
    duplicate: bool | None = None
    phase: Phase | None = None

    @property
    def accepted(self) -> bool:
        return self.status is ReplyStatus.ACCEPTED


class BatchReply(_Strict):
    """The reply to a batch submission (`{"jobs": [request, …]}`): `results[i]` answers
    `jobs[i]`. A batch refused as a whole (not a list, too many, too big) has `errors`
    and no results."""

    results: list[SubmitReply] = Field(default_factory=list)
    errors: list[FieldError] = Field(default_factory=list)


class CancelRequest(_Strict):
    """Sent to the gateway, which checks that the requester owns the job (or is an
    admin) and publishes it, signed, to sandfleet.control; every worker keeps the set of
    cancelled jobs."""

    job_id: JobId
    reason: Annotated[str, StringConstraints(max_length=512)] = "cancelled by request"
    requested_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    # Set by the gateway, which checked that this login may cancel the job, and signed.
    requested_by: Submitter | None = None
    signature: Signature | None = None


def field_errors(
    exc: ValidationError, *, prefix: str = "", limit: int | None = None
) -> list[FieldError]:
    """Flatten pydantic's errors into FieldErrors named by their full dotted path; the
    first `limit` of them when given (a 1 MiB request can break 100,000 rules)."""
    errors = []
    details = exc.errors(include_url=False, include_context=False, include_input=False)
    for err in details[:limit]:
        parts = [str(p) for p in err["loc"]]
        path = ".".join(p for p in (prefix, *parts) if p) or "request"
        message = err["msg"].removeprefix("Value error, ")
        errors.append(FieldError(field=path, message=message))
    return errors


__all__ = [
    "MAX_TIMEOUT_CONTEXT",
    "BatchReply",
    "CancelRequest",
    "DriverName",
    "GpuRequirement",
    "HostName",
    "Job",
    "JobId",
    "JobTemplate",
    "Placement",
    "ReplyStatus",
    "ResourceRequirements",
    "SandboxRequest",
    "SubmitReply",
    "Template",
    "field_errors",
]
