"""Who a worker is, as every event it publishes says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandfleet.common.events import Event, Phase


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    driver: str
    host: str

    def event(self, job_id: str | None, phase: Phase, reason: str, **fields: Any) -> Event:
        """An event stamped with this worker's driver, host and id."""
        return Event(
            job_id=job_id,
            phase=phase,
            reason=reason,
            driver=self.driver,
            host=self.host,
            worker_id=self.worker_id,
            **fields,
        )
