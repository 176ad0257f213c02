"""sandfleet's error tree.

    SandfleetError
    ├── DeadLetter            the message can never be processed: it goes to sandfleet.dead
    │   ├── RequestInvalid        a request or driver block broke a rule; carries FieldErrors
    │   └── MessageUndecodable    a body that is not JSON, or over the size limit
    ├── RetryLater            no capacity yet (GPUs busy): parked for `delay`, never requeued
    ├── SandboxError          a runtime refused or failed; `reason` is the event's reason code
    │   ├── ImageUnavailable      the image is missing and could not be pulled
    │   ├── CapabilityMissing     the runtime lacks something the job needs (e.g. CDI)
    │   ├── SandboxNameTaken      a sandbox of the job's name exists (a dead worker's late create)
    │   └── Unschedulable         the job's GPUs cannot be had (none such, or waited too long)
    └── what a client (sandfleet.Client, the CLI) tells its caller:
        ├── FleetUnreachable      no broker at the URL, credentials refused, or no gateway there
        ├── SubmissionRejected    the gateway refused a request; carries its FieldErrors
        ├── JobNotFound           the event log holds nothing about this job id
        └── ClientClosed          a closed client was used again

Backend exceptions (aiodocker's DockerError, libvirt's libvirtError) are translated
into SandboxError once, inside the driver that talks to the backend, with
``raise ... from exc``; nothing above a driver sees them.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # models imports this module
    from sandfleet.common.models import SubmitReply


class FieldError(BaseModel):
    """One broken rule, named by the full dotted path of the field that broke it."""

    model_config = ConfigDict(frozen=True)

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SandfleetError(Exception):
    """Base of every error sandfleet raises on purpose."""


class DeadLetter(SandfleetError):
    """Raised by a handler (after it emitted its event) to send the message to sandfleet.dead."""


class RequestInvalid(DeadLetter):
    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


class MessageUndecodable(DeadLetter):
    """The message cannot be read at all."""


class RetryLater(SandfleetError):
    """The job cannot start now; the worker parks it for `delay` seconds.

    RabbitMQ 3.10 counts every requeue toward a quorum queue's delivery limit, so the
    job is republished to its retry queue (which expires it back) instead of requeued.
    """

    def __init__(self, reason: str, *, delay: float, waiting_since: datetime) -> None:
        self.delay = delay
        self.waiting_since = waiting_since
        super().__init__(reason)


class SandboxError(SandfleetError):
    reason = "SandboxFailed"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(message)


class ImageUnavailable(SandboxError):
    reason = "ImageUnavailable"


class CapabilityMissing(SandboxError):
    reason = "CapabilityMissing"


class SandboxNameTaken(SandboxError):
    """A sandbox of this name exists already: for a deterministic per-job name, an
    earlier create of the same job (by a worker that died waiting for the answer)."""

    reason = "SandboxNameTaken"


class Unschedulable(SandboxError):
    reason = "Unschedulable"


class FleetUnreachable(SandfleetError, ConnectionError):
    """The fleet cannot be reached: no broker answers at the URL, it refused the login or
    the virtual host, or no gateway answers there. `url` has its password hidden.

    A ConnectionError, so code that retries on those (a broker restart) retries on it."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the fleet at {url}: {reason}")


class SubmissionRejected(SandfleetError):
    """The gateway refused a request; `errors` names every broken rule by its field path."""

    def __init__(self, reply: SubmitReply) -> None:
        self.reply = reply
        self.job_id = reply.job_id
        self.errors: list[FieldError] = list(reply.errors)
        details = "; ".join(str(e) for e in self.errors) or "no reason given"
        super().__init__(f"job {reply.job_id} rejected: {details}")


class CancelRefused(SandfleetError):
    """The gateway refused a cancellation: the job is unknown, or belongs to another
    submitter (only its submitter and the fleet's admins may cancel a job)."""

    def __init__(self, reply: SubmitReply) -> None:
        self.reply = reply
        self.job_id = reply.job_id
        self.errors: list[FieldError] = list(reply.errors)
        details = "; ".join(str(e) for e in self.errors) or "no reason given"
        super().__init__(f"cancel of job {reply.job_id} refused: {details}")


class JobNotFound(SandfleetError):
    """The event log holds no event of this job: never submitted here, or older than the
    log's retention (SANDFLEET_EVENTS_MAX_AGE)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} in the event log")


class ClientClosed(SandfleetError, RuntimeError):
    """A client was used outside its `with` block, or after it was closed."""
