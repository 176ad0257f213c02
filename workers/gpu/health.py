"""GPUs kept out of new claims: drained by an operator, or marked unhealthy (a critical
Xid, a GPU that stopped answering).

The states live in the claim store's JSON document, as its `gpu_states` section, and
change under the same lock as the claims (`GpuClaimStore.drain`, `mark_unhealthy`, ...):
a claim that commits after a drain never takes the drained GPU. A file written before
the section existed reads as every GPU healthy and undrained.

Neither state touches a claim already made: a drained GPU's running job runs on (a
drain only stops new claims); a job on a GPU that turns unhealthy is told so, and
stopped by setting (`sandfleet.workers.gpu_health`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

# Bounds on what an operator (or a driver's error text) writes into the store.
MAX_REASON_CHARS = 500
MAX_BY_CHARS = 100


def bounded(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, control characters made spaces (one line)."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, kw_only=True)
class Drain:
    reason: str
    by: str
    since: str  # ISO 8601, UTC


@dataclass(frozen=True, kw_only=True)
class Unhealthy:
    reason: str
    since: str  # ISO 8601, UTC


@dataclass(frozen=True, kw_only=True)
class GpuStates:
    """Per GPU UUID: its drain and its unhealthy mark, where it has one."""

    drained: dict[str, Drain] = field(default_factory=dict)
    unhealthy: dict[str, Unhealthy] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> GpuStates:
        """The `gpu_states` section (None or absent: nothing drained or unhealthy)."""
        if data is None:
            return cls()
        try:
            return cls(
                drained={uuid: Drain(**d) for uuid, d in data.get("drained", {}).items()},
                unhealthy={uuid: Unhealthy(**u) for uuid, u in data.get("unhealthy", {}).items()},
            )
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"claims.json gpu_states: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "drained": {uuid: asdict(d) for uuid, d in sorted(self.drained.items())},
            "unhealthy": {uuid: asdict(u) for uuid, u in sorted(self.unhealthy.items())},
        }

    def unavailable(self) -> dict[str, str]:
        """GPU UUID -> why no new claim may take it."""
        why = {uuid: f"unhealthy: {u.reason}" for uuid, u in self.unhealthy.items()}
        for uuid, drain in self.drained.items():
            why[uuid] = "; ".join(filter(None, (f"drained: {drain.reason}", why.get(uuid))))
        return why

    def drain(self, uuid: str, reason: str, by: str) -> GpuStates:
        """Drained now (a second drain replaces the first's reason and time)."""
        entry = Drain(
            reason=bounded(reason, MAX_REASON_CHARS), by=bounded(by, MAX_BY_CHARS), since=_now()
        )
        return replace(self, drained={**self.drained, uuid: entry})

    def undrain(self, uuid: str) -> GpuStates:
        return replace(self, drained={k: v for k, v in self.drained.items() if k != uuid})

    def mark_unhealthy(self, uuid: str, reason: str) -> GpuStates:
        """Unhealthy since its first mark: a repeated mark changes nothing."""
        if uuid in self.unhealthy:
            return self
        entry = Unhealthy(reason=bounded(reason, MAX_REASON_CHARS), since=_now())
        return replace(self, unhealthy={**self.unhealthy, uuid: entry})

    def mark_healthy(self, uuid: str) -> GpuStates:
        return replace(self, unhealthy={k: v for k, v in self.unhealthy.items() if k != uuid})

    def row(self, uuid: str) -> dict[str, Any]:
        """One GPU's health and drain state, as heartbeats and `sandfleet gpus` show it."""
        sick, drain = self.unhealthy.get(uuid), self.drained.get(uuid)
        return {
            "health": "healthy" if sick is None else "unhealthy",
            "health_reason": None if sick is None else sick.reason,
            "unhealthy_since": None if sick is None else sick.since,
            "drained": drain is not None,
            "drain_reason": None if drain is None else drain.reason,
            "drained_by": None if drain is None else drain.by,
            "drained_since": None if drain is None else drain.since,
        }
