"""The soak's GPU double-hold check: overlapping [claimed, terminal] spans on one GPU."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sandfleet.common.events import Event, Phase
from tests.support.gpus import double_holds

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(job_id: str, phase: Phase, at: float, gpus: list[str]) -> Event:
    when = T0 + timedelta(seconds=at)
    return Event(job_id=job_id, phase=phase, host="h", gpus=gpus, timestamp=when)


def test_back_to_back_holds_of_one_gpu_are_fine() -> None:
    events = [
        event("a", Phase.CLAIMED, 0, ["gpu=0"]),
        event("a", Phase.SUCCEEDED, 2, ["gpu=0"]),
        event("b", Phase.CLAIMED, 2.5, ["gpu=0", "gpu=1"]),
        event("b", Phase.FAILED, 4, ["gpu=0", "gpu=1"]),
    ]
    assert double_holds(events) == []


def test_overlapping_holds_of_one_gpu_are_reported() -> None:
    events = [
        event("a", Phase.CLAIMED, 0, ["gpu=0"]),
        event("b", Phase.CLAIMED, 1, ["gpu=1", "gpu=0"]),
        event("a", Phase.SUCCEEDED, 2, ["gpu=0"]),
        event("b", Phase.SUCCEEDED, 3, ["gpu=1", "gpu=0"]),
    ]
    assert double_holds(events) == ["gpu=0: a and b"]


def test_only_the_last_claim_of_a_job_counts() -> None:
    # Claimed by a worker that died; the next one released it and claimed again later.
    events = [
        event("a", Phase.CLAIMED, 0, ["gpu=0"]),
        event("b", Phase.CLAIMED, 1, ["gpu=0"]),
        event("b", Phase.SUCCEEDED, 2, ["gpu=0"]),
        event("a", Phase.CLAIMED, 3, ["gpu=0"]),
        event("a", Phase.SUCCEEDED, 4, ["gpu=0"]),
    ]
    assert double_holds(events) == []
