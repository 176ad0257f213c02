"""Events about one job, stamped with the worker's identity."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from common.amqp import EventPublisher
from common.errors import FieldError
from common.events import Event, Phase, bounded_output
from common.models import Driver


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    driver: Driver
    host: str


class JobReporter:
    def __init__(self, events: EventPublisher, identity: WorkerIdentity, job_id: str) -> None:
        self._events = events
        self._identity = identity
        self.job_id = job_id
        self.sandbox_id: str | None = None
        self.gpus: list[str] = []
        # Called with a terminal event before it is published (the journal keeps it).
        self.before_terminal: Callable[[Event], None] | None = None

    async def emit(
        self,
        phase: Phase,
        reason: str,
        message: str = "",
        *,
        exit_code: int | None = None,
        output: str | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        event = Event(
            job_id=self.job_id,
            phase=phase,
            reason=reason,
            message=message,
            driver=self._identity.driver.value,
            host=self._identity.host,
            worker_id=self._identity.worker_id,
            gpus=self.gpus,
            sandbox_id=self.sandbox_id,
            exit_code=exit_code,
            output=None if output is None else bounded_output(output),
            errors=errors or [],
        )
        if event.phase.is_terminal and self.before_terminal is not None:
            await asyncio.to_thread(self.before_terminal, event)
        await self._events.publish(event)
