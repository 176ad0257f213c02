"""How long a job spent in each stage of its life (`sandfleet.common.events.STAGES`).

A worker marks the moments a job passes on its way (taken, GPUs claimed, create
begun, sandbox created, started) in the job's journal entry, so that a job taken over
by another worker still reports the stages its first worker saw. Its terminal event's
`timings` are worked out from those marks, the gateway's `submitted_at`, and the
first GPU wait (`waiting_since`, which travels with a parked job):

    queued    submitted → first taken by a worker (its first GPU wait, if it waited)
    gpu_wait  first taken (or first GPU wait) → GPUs claimed, across parks
    creating  create begun → sandbox created (the image pull included)
    starting  sandbox created → started
    running   started → ended
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

TAKEN = "taken"
CLAIMED = "claimed"
CREATING = "creating"
CREATED = "created"
STARTED = "started"


def stage_timings(
    marks: Mapping[str, datetime],
    *,
    submitted_at: datetime,
    waiting_since: datetime | None,
    ended_at: datetime,
) -> dict[str, float]:
    """Seconds per stage; a stage whose start or end was never marked is left out.

    A negative span (the gateway's clock ahead of the worker's) counts as 0.
    """
    first_taken = waiting_since or marks.get(TAKEN)
    spans = {
        "queued": (submitted_at, first_taken),
        "gpu_wait": (first_taken, marks.get(CLAIMED)),
        "creating": (marks.get(CREATING), marks.get(CREATED)),
        "starting": (marks.get(CREATED), marks.get(STARTED)),
        "running": (marks.get(STARTED), ended_at),
    }
    return {
        stage: max(0.0, (end - start).total_seconds())
        for stage, (start, end) in spans.items()
        if start is not None and end is not None
    }
