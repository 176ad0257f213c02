"""Questions to the gateways' job view and their answers, as they travel on the broker.

A client publishes a `ViewQuery` to sandfleet.queries; a gateway answers from its own
view (sandfleet.gateway.job_view) with a `ViewReply` through direct reply-to. Both are
bounded: a query names at most `MAX_JOBS_LIMIT` jobs and `MAX_LABEL_FILTERS` labels, and a
reply carries at most `MAX_HISTORY_ENTRIES` history entries of bounded text.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sandfleet.common.errors import FieldError
from sandfleet.common.events import Phase
from sandfleet.common.models import DriverName, HostName, JobId, field_errors

MAX_JOBS_LIMIT = 1000
DEFAULT_JOBS_LIMIT = 50
MAX_LABEL_FILTERS = 16
MAX_HISTORY_ENTRIES = 200
MAX_HISTORY_TEXT = 500  # characters of an entry's message kept
MAX_QUERY_BYTES = 16 << 10
# A year: "since" beyond what any log keeps is a typo, not a question.
MAX_SINCE_SECONDS = 366 * 86400.0

QueryKind = Literal["status", "jobs", "stats"]
LabelText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ViewQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: QueryKind
    job_id: JobId | None = None  # status: the job asked about
    phase: Phase | None = None
    driver: DriverName | None = None
    host: HostName | None = None
    labels: dict[LabelText, str] = Field(default_factory=dict, max_length=MAX_LABEL_FILTERS)
    submitted_by: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    # Jobs submitted (jobs) or ended (stats) within the last `since_seconds`.
    since_seconds: float | None = Field(default=None, gt=0, le=MAX_SINCE_SECONDS)
    limit: int = Field(default=DEFAULT_JOBS_LIMIT, ge=1, le=MAX_JOBS_LIMIT)


class HistoryEntry(BaseModel):
    phase: Phase
    reason: str = ""
    message: str = ""
    host: str
    worker_id: str | None = None
    timestamp: datetime


class JobSummary(BaseModel):
    job_id: str
    phase: Phase
    driver: str | None = None
    host: str | None = None  # the worker's host, once a worker has spoken of the job
    worker_id: str | None = None
    gpus: list[str] = Field(default_factory=list)
    exit_code: int | None = None
    submitted_by: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    submitted_at: datetime
    updated_at: datetime
    timings: dict[str, float] | None = None


class JobDetail(JobSummary):
    # the job's events, oldest first (as `sandfleet status --json` showed them from the log)
    events: list[HistoryEntry] = Field(default_factory=list)


class StageStats(BaseModel):
    count: int
    p50: float
    p95: float
    p99: float


class FleetStats(BaseModel):
    jobs: int  # ended jobs whose timings were counted
    stages: dict[str, StageStats] = Field(default_factory=dict)
    by_driver: dict[str, dict[str, StageStats]] = Field(default_factory=dict)
    by_host: dict[str, dict[str, StageStats]] = Field(default_factory=dict)


class ViewStatus(StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    REJECTED = "rejected"


class ViewReply(BaseModel):
    status: ViewStatus
    gateway: str  # the host of the gateway that answered
    errors: list[FieldError] = Field(default_factory=list)
    job: JobDetail | None = None
    jobs: list[JobSummary] | None = None
    stats: FleetStats | None = None
    truncated: bool | None = None  # jobs were left off to keep the reply in bounds


_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_seconds(text: str) -> float:
    """`30s`, `15m`, `1h`, `2d`, `1w` (or plain seconds) as seconds; ValueError otherwise."""
    match = _SINCE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 15m, 1h, 2d, 1w)")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_SINCE_SECONDS:
        raise ValueError(f"{text!r} is out of range (more than 0, at most 366d)")
    return seconds


def label_filters(pairs: list[str]) -> dict[str, str]:
    """`k=v` pairs as a dict; ValueError naming the first that is not one."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not a label filter (key=value)")
        labels[key] = value
    return labels


def parse_query(body: bytes) -> ViewQuery | list[FieldError]:
    """The query in `body`, or why it is none (each error named by its field path)."""
    if len(body) > MAX_QUERY_BYTES:
        return [FieldError(field="query", message=f"{len(body)} bytes; the limit is "
                           f"{MAX_QUERY_BYTES}")]  # fmt: skip
    try:
        query = ViewQuery.model_validate_json(body)
    except ValidationError as exc:
        return field_errors(exc, prefix="query", limit=10)
    if query.kind == "status" and query.job_id is None:
        return [FieldError(field="query.job_id", message="a status query names its job")]
    return query
