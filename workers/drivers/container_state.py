"""Reading a container's state from Docker's or Podman's inspect document (same shape).

Shared by the container drivers; it is not a driver itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sandfleet.workers.drivers.base import (
    LABEL_JOB_ID,
    LABEL_POOL,
    WARM_NAME_PREFIX,
    SandboxState,
    SandboxStatus,
)
from sandfleet.workers.drivers.timestamps import parse_runtime_time

_STATUS = {
    "created": SandboxStatus.CREATED,
    "configured": SandboxStatus.CREATED,  # podman: created, not yet initialised
    "initialized": SandboxStatus.CREATED,
    "running": SandboxStatus.RUNNING,
    "paused": SandboxStatus.RUNNING,
    "restarting": SandboxStatus.RUNNING,
    "stopping": SandboxStatus.RUNNING,
}  # exited, stopped, dead, removing: EXITED


def state_from_inspect(info: dict[str, Any]) -> SandboxState:
    state = info["State"]
    status = _STATUS.get(str(state.get("Status", "")).lower(), SandboxStatus.EXITED)
    name = str(info["Name"]).lstrip("/")
    labels = (info.get("Config") or {}).get("Labels") or {}
    job_id = _taken_by(name, labels)
    return SandboxState(
        sandbox_id=info["Id"],
        name=name,
        status=status,
        exit_code=state.get("ExitCode") if status is SandboxStatus.EXITED else None,
        # A taken warm container started for its pool, before its job was known: the
        # job's start is the one in the worker's journal.
        started_at=None if job_id else parse_runtime_time(state.get("StartedAt")),
        labels={**labels, LABEL_JOB_ID: job_id} if job_id else labels,
    )


def _taken_by(name: str, labels: Mapping[str, str]) -> str | None:
    """The job a warm container was taken by: labels are fixed at create, before any
    job was known, so its name (`sandfleet-<job id>` once taken) says whose it is."""
    if LABEL_POOL not in labels or name.startswith(WARM_NAME_PREFIX):
        return None
    job_id = name.removeprefix("sandfleet-")
    return job_id if job_id != name else None
