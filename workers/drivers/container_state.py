"""Reading a container's state from Docker's or Podman's inspect document (same shape).

Shared by the container drivers; it is not a driver itself.
"""

from __future__ import annotations

from typing import Any

from sandfleet.workers.drivers.base import SandboxState, SandboxStatus
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
    return SandboxState(
        sandbox_id=info["Id"],
        name=str(info["Name"]).lstrip("/"),
        status=status,
        exit_code=state.get("ExitCode") if status is SandboxStatus.EXITED else None,
        started_at=parse_runtime_time(state.get("StartedAt")),
        labels=(info.get("Config") or {}).get("Labels") or {},
    )
