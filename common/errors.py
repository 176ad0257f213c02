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

import json
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


class _GatewayRefusal(SandfleetError):
    """The gateway said no: `reply` is its answer, `errors` every reason by field path."""

    # The message reads "<what> <job id> <outcome>: <reasons>".
    what, outcome = "job", "refused"

    def __init__(self, reply: SubmitReply) -> None:
        self.reply = reply
        self.job_id = reply.job_id
        self.errors: list[FieldError] = list(reply.errors)
        details = "; ".join(str(e) for e in self.errors) or "no reason given"
        super().__init__(f"{self.what} {reply.job_id} {self.outcome}: {details}")


class SubmissionRejected(_GatewayRefusal):
    """The gateway refused a request; `errors` names every broken rule by its field path."""

    what, outcome = "job", "rejected"


class CancelRefused(_GatewayRefusal):
    """The gateway refused a cancellation: the job is unknown, or belongs to another
    submitter (only its submitter and the fleet's admins may cancel a job)."""

    what, outcome = "cancel of job", "refused"


class JobNotFound(SandfleetError):
    """The event log holds no event of this job: never submitted here, or older than the
    log's retention (SANDFLEET_EVENTS_MAX_AGE)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} in the event log")


class ClientClosed(SandfleetError, RuntimeError):
    """A client was used outside its `with` block, or after it was closed."""


# What a rejection (its event and its reply) may carry, whatever the request held: a
# 1 MiB request can break thousands of rules, each message quoting its input.
MAX_REPORTED_ERRORS = 20
MAX_ERROR_FIELD_CHARS = 160
MAX_ERROR_MESSAGE_CHARS = 240
# Room for the longest single error even were every character escaped (6 bytes each), so
# at least one error is always shown.
MAX_ERRORS_JSON_BYTES = 3072
_SUMMARY_JSON_BYTES = 80  # `{"field": "request", "message": "N more errors not shown"}`


def bounded_errors(errors: list[FieldError], *, total: int | None = None) -> list[FieldError]:
    """At most MAX_REPORTED_ERRORS errors, each cut short, in MAX_ERRORS_JSON_BYTES; when
    some must go, the last says how many: what a rejection's event and reply carry.

    `total`: how many errors `errors` (then only the first of them) stands for.
    Bounding a bounded list changes nothing, so every step on the way may apply it.
    """
    total = len(errors) if total is None else total
    cut = [_cut_error(error) for error in errors[:MAX_REPORTED_ERRORS]]
    if total <= MAX_REPORTED_ERRORS and _json_size(cut) <= MAX_ERRORS_JSON_BYTES:
        return cut
    kept: list[FieldError] = []
    budget = MAX_ERRORS_JSON_BYTES - _SUMMARY_JSON_BYTES
    for error in cut[: MAX_REPORTED_ERRORS - 1]:
        budget -= _json_size([error])
        if budget < 0:
            break
        kept.append(error)
    more = total - len(kept)
    return [*kept, FieldError(field="request", message=f"{more} more errors not shown")]


def _cut_error(error: FieldError) -> FieldError:
    return FieldError(
        field=_cut(error.field, MAX_ERROR_FIELD_CHARS),
        message=_cut(error.message, MAX_ERROR_MESSAGE_CHARS),
    )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _json_size(errors: list[FieldError]) -> int:
    """The errors' size in UTF-8 JSON: at most 6 bytes a character (`\\u0000`)."""
    return sum(_json_bytes(e.field) + _json_bytes(e.message) + 24 for e in errors)


def _json_bytes(text: str) -> int:
    # surrogatepass: a lone surrogate is counted (3 bytes), not an error here.
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass"))
