"""Status events: one JSON message per step of a job's life, plus worker heartbeats."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandfleet.common.errors import FieldError


class Phase(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    WAITING = "waiting"
    CLAIMED = "claimed"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    HEARTBEAT = "heartbeat"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_PHASES


# Every phase of a job's life: all but workers' heartbeats.
JOB_PHASES = frozenset(phase for phase in Phase if phase is not Phase.HEARTBEAT)
TERMINAL_PHASES = frozenset(
    {Phase.REJECTED, Phase.SUCCEEDED, Phase.FAILED, Phase.TIMED_OUT, Phase.CANCELLED}
)

# The stages of a job's life whose durations a terminal event's `timings` carries:
# accepted → taken by a worker (queued), waiting for GPUs, creating the sandbox (with the
# image pull), starting it, and running it to its end.
STAGES = ("queued", "gpu_wait", "creating", "starting", "running")

HEARTBEAT_ALIVE = "Alive"
HEARTBEAT_STOPPED = "Stopped"  # the worker's last heartbeat, sent as it shuts down
# A worker silent for this many heartbeat periods is presumed lost.
LOST_AFTER_BEATS = 3

# Keeps events small enough for a stream: the output is the *last* lines, bounded.
MAX_OUTPUT_CHARS = 8192


class WorkerHealth(BaseModel):
    """What a heartbeat says about its worker."""

    model_config = ConfigDict(frozen=True)

    slots: int
    free_slots: int
    jobs_started: int = 0
    jobs_finished: int = 0
    started_at: datetime
    heartbeat_seconds: float
    # The host's inventory, each GPU with its health ("healthy"/"unhealthy",
    # health_reason) and drain state (drained, drain_reason, drained_by, drained_since)
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    # whole GPUs a count-only job could claim now: not held (in whole or in part),
    # drained, unhealthy, nor in MIG mode
    gpus_free: int = 0
    gpu_source: str = ""
    gpu_health_source: str = ""  # what marks GPUs unhealthy: "nvml", or "none"
    # Its warm pools: per profile, {"pool", "image", "ready", "target", "error"}
    warm_pools: list[dict[str, Any]] = Field(default_factory=list)
    jobs_warm: int = 0  # jobs it started in a warm sandbox
    jobs_cold: int = 0  # jobs it made a sandbox for


# Why a claim got the GPUs it got (sandfleet.workers.gpu.placement): a fully
# NVLink-connected set, the best-connected set on one NUMA node, any, the smallest free
# NVLink group (one GPU), MIG instances, exactly those named, or the claim it held.
MAX_PLACED_GPUS = 64


class GpuPlacement(BaseModel):
    """The `claimed` event's account of the GPUs chosen: UUIDs (GPU or MIG) and why."""

    model_config = ConfigDict(frozen=True)

    gpus: list[Annotated[str, Field(max_length=128)]] = Field(max_length=MAX_PLACED_GPUS)
    why: Literal["nvlink", "numa", "any", "packed", "mig", "exact", "kept"]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    job_id: str | None
    phase: Phase
    reason: str = ""
    message: str = ""
    driver: str | None = None
    host: str
    worker_id: str | None = None
    # The broker login that submitted the job (None on heartbeats and on rejections of
    # messages that named no verifiable submitter).
    submitted_by: str | None = None
    gpus: list[str] = Field(default_factory=list)
    sandbox_id: str | None = None
    # A process's exit status: bounded, so a forged giant number is no event at all.
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    output: str | None = Field(default=None, max_length=MAX_OUTPUT_CHARS)
    errors: list[FieldError] = Field(default_factory=list)
    health: WorkerHealth | None = None
    # Terminal events: seconds spent in each stage of the job's life (STAGES); a stage
    # the job never reached is left out.
    timings: dict[str, float] | None = None
    # The gateway's `accepted` event: the job's labels, for the job view's filters.
    labels: dict[str, str] | None = None
    # The `claimed` event: which GPUs were chosen, and why.
    placement: GpuPlacement | None = None
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def routing_key(self) -> str:
        """`<phase>.<driver>.<host>` on the events topic exchange."""
        return f"{self.phase.value}.{self.driver or 'none'}.{self.host}"


log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def logged_model(model: type[M], body: bytes, what: str) -> M | None:
    """`body` read from a log as `model`; None, logged, when it is not `what`."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        log.warning(
            "skipped a %d-byte message in a log that is not %s (%d errors)",
            len(body),
            what,
            exc.error_count(),
        )
        return None


def event_from_log(body: bytes, routing_key: str | None) -> Event | None:
    """The event in a message read from the event log; None (logged) for anything else.

    An event counts only under its own routing key: the broker lets each publisher
    use only its own keys (workers: their host's), so an event that names another host
    or phase than its key, or a marker dressed as an event, was forged.
    """
    event = logged_model(Event, body, "an event")
    if event is None:
        return None
    if routing_key != event.routing_key:
        log.warning(
            "skipped event %s: published under routing key %r, not its own %r",
            event.event_id,
            routing_key,
            event.routing_key,
        )
        return None
    return event


def bounded_output(text: str, *, limit: int = MAX_OUTPUT_CHARS) -> str:
    """The tail of `text`, at most `limit` characters, cut at a line start when possible."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    newline = tail.find("\n")
    return tail[newline + 1 :] if 0 <= newline < len(tail) - 1 else tail


def worker_state(heartbeat: Event, now: datetime) -> str:
    """`alive`, `stopped` (said goodbye) or `lost` (silent too long), from a last heartbeat."""
    if heartbeat.reason == HEARTBEAT_STOPPED:
        return "stopped"
    period = heartbeat.health.heartbeat_seconds if heartbeat.health else 10.0
    silent = (now - heartbeat.timestamp).total_seconds()
    return "lost" if silent > LOST_AFTER_BEATS * period else "alive"
