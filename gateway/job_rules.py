"""Which events change what the gateway knows of a job id: one rule for the job index's
unwritten events and the job view, so both name the same owner and phase."""

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
        # The first `accepted` in the log takes the id: a later one (another gateway's
        # twin, an echo: common.event_replay) repeats it, and an ended job is not
        # reopened. Only an id whose last word was a rejection is free to take again.
        return current is Phase.REJECTED
    # After its end, only an end counts: a worker's late or repeated word from before
    # it (an echo, a dead worker's) does not take the job back.
    return not current.is_terminal or event.phase.is_terminal
