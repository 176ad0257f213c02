"""Who may do what with a job id: the gateway's rules, over the ids its index knows.

A job id belongs to the broker login that first used it (the AMQP user_id the broker
validated): nobody else may submit under it, reset it with a rejected request, or
cancel it, except the fleet's admins, who may cancel anything. A gateway rejection
speaks for a job id (its `rejected` event carries the id) only when that id is free
or is its submitter's own id whose last word was a rejection; otherwise it goes out
under a fresh id, so no stranger's event ever ends or frees a job that is not theirs.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from sandfleet.common.errors import FieldError
from sandfleet.common.events import Phase
from sandfleet.gateway.envelope import job_id_hint, new_job_id


class KnownJobs(Protocol):
    def known(self, job_id: str) -> bool: ...
    def owner(self, job_id: str) -> str | None: ...
    def existing(self, job_id: str) -> Phase | None: ...


UNIDENTIFIED = FieldError(
    field="user_id",
    message="the message carries no AMQP user_id; set it to your broker login "
    "(sandfleet's clients do), which the broker checks",
)


class Ownership:
    def __init__(self, jobs: KnownJobs, admins: Collection[str]) -> None:
        self._jobs = jobs
        self._admins = frozenset(admins)

    def submit_refusal(self, job_id: str, submitter: str) -> FieldError | None:
        """Why `submitter` may not submit under `job_id`, if they may not."""
        if self._taken_by_another(job_id, submitter):
            return FieldError(
                field="job_id",
                message=f"job id {job_id!r} belongs to another submitter; choose another "
                "(or leave job_id out for a fresh one)",
            )
        return None

    def cancel_refusal(self, job_id: str, requester: str) -> FieldError | None:
        """Why `requester` may not cancel `job_id`, if they may not."""
        if not self._jobs.known(job_id):
            return FieldError(field="job_id", message=f"no job {job_id!r} is known here")
        if requester not in self._admins and self._taken_by_another(job_id, requester):
            return FieldError(
                field="job_id",
                message=f"job {job_id!r} belongs to another submitter; only its submitter "
                "or a fleet admin may cancel it",
            )
        return None

    def ended(self, job_id: str) -> Phase | None:
        """The phase `job_id` ended in, if the gateway knows it ended."""
        phase = self._jobs.existing(job_id)
        if phase is None and self._jobs.known(job_id):
            return Phase.REJECTED  # known, and its last word was a rejection
        return phase if phase is not None and phase.is_terminal else None

    def rejection_id(self, request: Any, submitter: str | None) -> str:
        """The id a rejection of `request` (decoded JSON, or None) goes out under: the id
        it names when that id is well formed and the submitter may speak for it, else a
        fresh one."""
        hint = job_id_hint(request)
        # job_id_hint gives only well-formed ids (the job-id pattern).
        if hint is None or submitter is None:
            return new_job_id()
        if self._jobs.existing(hint) is not None or self._taken_by_another(hint, submitter):
            return new_job_id()  # a live job's history is not for a bad request to end
        return hint

    def _taken_by_another(self, job_id: str, login: str) -> bool:
        owner = self._jobs.owner(job_id)
        # An id logged before identities were recorded has no owner: anyone's, as it was.
        return owner is not None and owner != login
