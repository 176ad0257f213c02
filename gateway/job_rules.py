"""Which events change what the gateway knows of a job id: one rule for the in-memory
job index and the job view, so both name the same owner and phase."""

from __future__ import annotations

from sandfleet.common.events import Event, Phase


def counts(current: Phase | None, event: Event) -> bool:
    """Whether `event` changes a job whose known phase is `current` (None: unknown)."""
    if event.job_id is None or event.phase is Phase.HEARTBEAT:
        return False
    if current is None and event.phase is not Phase.ACCEPTED:
        # An id is the fleet's once the gateway accepted it. A rejection alone takes no
        # id (a flood of bad requests must not fill the index), and a worker's word
        # about an id the gateway never accepted counts for nothing here.
        return False
    if current is None:
        return True
    if event.phase is Phase.ACCEPTED:
        # A terminal phase is final (a late `accepted` does not reopen it), and an
        # `accepted` for a job already known repeats the first (common.event_replay).
        return False
    # After its end, only an end counts: a worker's late or repeated word from before
    # it (an echo, a dead worker's) does not take the job back.
    return not current.is_terminal or event.phase.is_terminal
