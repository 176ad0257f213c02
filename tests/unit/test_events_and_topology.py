from __future__ import annotations

from sandfleet.common.events import MAX_OUTPUT_CHARS, Event, Phase, bounded_output
from sandfleet.common.topology import (
    EVENTS_LOG_QUEUE,
    HEARTBEATS_LOG_QUEUE,
    LOG_MARKER_KEY_PREFIX,
    event_log_keys,
    heartbeat_log_keys,
    job_queue_name,
    job_routing_key,
)
from sandfleet.gateway.events_stream import EventFilter


def test_event_routing_key_is_phase_driver_host() -> None:
    event = Event(job_id="j", phase=Phase.RUNNING, driver="docker", host="gpu-01")
    assert event.routing_key == "running.docker.gpu-01"
    assert Event(job_id="j", phase=Phase.REJECTED, host="gw").routing_key == "rejected.none.gw"


def test_terminal_phases() -> None:
    terminal = {p for p in Phase if p.is_terminal}
    assert terminal == {
        Phase.REJECTED,
        Phase.SUCCEEDED,
        Phase.FAILED,
        Phase.TIMED_OUT,
        Phase.CANCELLED,
    }


def test_output_is_bounded_to_its_last_lines() -> None:
    text = "".join(f"line {i}\n" for i in range(5000))
    tail = bounded_output(text)
    assert len(tail) <= MAX_OUTPUT_CHARS
    assert tail.endswith("line 4999\n")
    assert tail.startswith("line ")  # cut at a line start, not mid-line
    assert bounded_output("short\n") == "short\n"


def test_job_queue_names() -> None:
    assert job_routing_key("docker") == "docker"
    assert job_routing_key("vm", "gpu-01") == "vm.gpu-01"
    assert job_queue_name("podman", "h") == "sandfleet.jobs.podman.h"


def _bound(keys: list[str], routing_key: str) -> bool:
    """Whether a topic binding among `keys` (all `<word>.#`) takes `routing_key`."""
    return any(routing_key.startswith(key.removesuffix("#")) for key in keys)


def test_heartbeats_go_to_their_own_log_and_every_job_event_to_the_event_log() -> None:
    assert all(key.endswith(".#") and key.count(".") == 1 for key in event_log_keys())
    for phase in Phase:
        key = Event(job_id="j", phase=phase, driver="docker", host="h").routing_key
        in_events, in_beats = _bound(event_log_keys(), key), _bound(heartbeat_log_keys(), key)
        assert (in_events, in_beats) == (phase is not Phase.HEARTBEAT, phase is Phase.HEARTBEAT)
    marker = f"{LOG_MARKER_KEY_PREFIX}{'0' * 32}"
    assert _bound(event_log_keys(), marker) and _bound(heartbeat_log_keys(), marker)


def test_a_reader_reads_only_the_logs_its_filter_can_match() -> None:
    assert EventFilter().logs() == (EVENTS_LOG_QUEUE, HEARTBEATS_LOG_QUEUE)
    assert EventFilter(phases={Phase.HEARTBEAT}).logs() == (HEARTBEATS_LOG_QUEUE,)
    assert EventFilter(phases={Phase.RUNNING}).logs() == (EVENTS_LOG_QUEUE,)
    both = {Phase.RUNNING, Phase.HEARTBEAT}
    assert EventFilter(phases=both).logs() == (EVENTS_LOG_QUEUE, HEARTBEATS_LOG_QUEUE)
    # a job's events: never a heartbeat (heartbeats belong to no job)
    assert EventFilter(job_id="j").logs() == (EVENTS_LOG_QUEUE,)
    assert EventFilter(job_id="j", phases={Phase.HEARTBEAT}).logs() == (EVENTS_LOG_QUEUE,)
