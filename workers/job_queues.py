"""Where a worker puts a job back on the broker: its host's queue, or its retry queue.

- bound to the host: a job taken from the driver's shared queue is republished
  (confirmed) to `sandfleet.jobs.<driver>.<host>` before the shared copy is acked, so
  from then on only workers of this host ever see it;
- parked: a job whose GPUs are busy waits in `sandfleet.retry.<driver>.<host>` (through
  the `sandfleet.retry` exchange), which expires it back to the host's queue after the
  delay, holding no slot and no GPU.
The job goes back as the gateway signed it: its signature travels inside it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from aio_pika.abc import AbstractExchange, HeadersType

from sandfleet.common.amqp import job_message, publish_through_outages
from sandfleet.common.models import Job
from sandfleet.common.topology import (
    RETRY_WAITING_SINCE_HEADER,
    job_routing_key,
)


class JobQueues(Protocol):
    async def bind_to_host(self, job: Job) -> None: ...
    async def park(self, job: Job, *, delay: float, waiting_since: datetime) -> None: ...


class HostJobQueues:
    """`JobQueues` on the broker."""

    def __init__(
        self, jobs: AbstractExchange, retry: AbstractExchange, *, driver: str, host: str
    ) -> None:
        # Both on a channel with publisher confirms, and returns raised.
        self._jobs = jobs
        self._retry = retry
        self._host_key = job_routing_key(driver, host)

    async def bind_to_host(self, job: Job) -> None:
        await self._jobs.publish(job_message(job), routing_key=self._host_key, mandatory=True)

    async def park(self, job: Job, *, delay: float, waiting_since: datetime) -> None:
        """Retried through a broker outage; an error after that means it is not parked."""
        headers = {RETRY_WAITING_SINCE_HEADER: waiting_since.isoformat()}
        message = job_message(job, headers=headers, expiration=delay)
        await publish_through_outages(
            lambda: self._retry.publish(message, routing_key=self._host_key, mandatory=True),
            what=f"job {job.job_id} (parked)",
        )


def waiting_since(headers: HeadersType | None) -> datetime | None:
    """When a parked job first found its GPUs busy, from its message."""
    value = (headers or {}).get(RETRY_WAITING_SINCE_HEADER)
    return datetime.fromisoformat(value) if isinstance(value, str) else None
