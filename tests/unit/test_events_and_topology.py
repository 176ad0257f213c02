from __future__ import annotations

from sandfleet.common.events import MAX_OUTPUT_CHARS, Event, Phase, bounded_output
from sandfleet.common.topology import job_queue_name, job_routing_key


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
