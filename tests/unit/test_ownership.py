"""The gateway's ownership rules: a job id is its first submitter's."""

from __future__ import annotations

from dataclasses import dataclass, field

from sandfleet.common.events import Phase
from sandfleet.gateway.ownership import Ownership


@dataclass
class Jobs:
    phases: dict[str, Phase] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def known(self, job_id: str) -> bool:
        return job_id in self.phases

    def owner(self, job_id: str) -> str | None:
        return self.owners.get(job_id)

    def existing(self, job_id: str) -> Phase | None:
        phase = self.phases.get(job_id)
        return None if phase is Phase.REJECTED else phase


def rules() -> Ownership:
    jobs = Jobs(
        phases={"running": Phase.RUNNING, "refused": Phase.REJECTED, "old": Phase.SUCCEEDED},
        owners={"running": "alice", "refused": "alice"},  # "old" predates identities
    )
    return Ownership(jobs, admins={"root"})


def test_only_the_owner_may_submit_under_an_id() -> None:
    own = rules()
    assert own.submit_refusal("running", "alice") is None  # a duplicate: answered, not run
    assert own.submit_refusal("new", "bob") is None
    assert own.submit_refusal("old", "bob") is None  # no owner recorded: as before
    refusal = own.submit_refusal("running", "bob")
    assert refusal is not None and refusal.field == "job_id"
    assert own.submit_refusal("refused", "bob") is not None  # rejected, still alice's


def test_only_the_owner_or_an_admin_may_cancel_and_only_a_known_job() -> None:
    own = rules()
    assert own.cancel_refusal("running", "alice") is None
    assert own.cancel_refusal("running", "root") is None
    refused = own.cancel_refusal("running", "bob")
    assert refused is not None and "belongs to another submitter" in refused.message
    unknown = own.cancel_refusal("future-id", "alice")
    assert unknown is not None and "no job 'future-id'" in unknown.message
    assert own.cancel_refusal("future-id", "root") is not None  # admins too: nothing to cancel


def test_a_rejection_speaks_only_for_an_id_its_submitter_may_reset() -> None:
    own = rules()
    assert own.rejection_id({"job_id": "fresh"}, "bob") == "fresh"
    assert own.rejection_id({"job_id": "refused"}, "alice") == "refused"  # alice's, never ran
    for request, who in [
        ({"job_id": "running"}, "alice"),  # live: a bad resubmission must not end it
        ({"job_id": "running"}, "bob"),  # another's
        ({"job_id": "refused"}, "bob"),  # another's, even though it never ran
        ({"job_id": "no spaces allowed"}, "bob"),  # not a job id at all
        ({"job_id": "x" * 63 + "/"}, "bob"),
        ({"job_id": "fresh"}, None),  # nobody identified
        (None, "bob"),
    ]:
        chosen = own.rejection_id(request, who)
        assert chosen.startswith("job-") and chosen != (request or {}).get("job_id")


def test_a_job_that_ended_is_known_to_have_ended() -> None:
    own = rules()
    assert own.ended("old") is Phase.SUCCEEDED
    assert own.ended("refused") is Phase.REJECTED
    assert own.ended("running") is None
    assert own.ended("never-seen") is None
