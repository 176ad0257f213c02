"""The roles' permission patterns, as RabbitMQ will match them (PCRE, like Python's re for
these patterns): each names exactly the resources its role needs."""

from __future__ import annotations

import re

import pytest

from sandfleet.common import broker_roles as roles


def allows(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


def test_a_worker_reaches_its_own_hosts_queues_and_its_drivers_shared_ones_only() -> None:
    worker = roles.worker("gpu-1", ["docker", "vm"])
    assert worker.configure == "^$"  # declares nothing: binding would let it read others' jobs
    for name in ("sandfleet.jobs.docker", "sandfleet.jobs.docker.gpu-1", "sandfleet.jobs.vm.gpu-1",
                 "sandfleet.control.log"):  # fmt: skip
        assert allows(worker.read, name), name
    for name in ("sandfleet.jobs.docker.gpu-2", "sandfleet.jobs.docker.gpu-10",
                 "sandfleet.jobs.podman", "sandfleet.jobs", "sandfleet.retry",
                 "sandfleet.events.log", "sandfleet.submit"):  # fmt: skip
        assert not allows(worker.read, name), name  # no read on an exchange: no binding
    assert not allows(worker.write, "amq.default")
    assert allows(worker.events_write, "timed_out.docker.gpu-1")
    for key in ("succeeded.docker.gpu-2", "succeeded.docker.gpu-1x", "log-marker.ab",
                "succeeded.podman.gpu-1", "succeeded.docker.gpu-1.extra",
                "accepted.docker.gpu-1"):  # fmt: skip
        assert not allows(worker.events_write, key), key


def test_submitters_and_observers_write_only_where_they_must() -> None:
    for role in (roles.submitter(), roles.observer()):
        assert role.configure == "^$"
        assert not allows(role.write, "amq.default")
        assert not allows(role.write, "sandfleet.jobs")
        assert not allows(role.write, "sandfleet.control")
        assert allows(role.events_write, "log-marker." + "a" * 32)
        assert not allows(role.events_write, "succeeded.docker.h")
        assert not allows(role.read, "sandfleet.jobs.docker")
    assert allows(roles.submitter().write, "sandfleet.submissions")
    assert not allows(roles.observer().write, "sandfleet.submissions")


def test_names_that_would_break_a_pattern_or_borrow_a_role_are_refused() -> None:
    with pytest.raises(ValueError, match="host name"):
        roles.worker("a.*", ["docker"])
    with pytest.raises(ValueError, match="driver name"):
        roles.worker("h", ["Docker|vm"])
    with pytest.raises(ValueError, match="reserved"):
        roles.check_submitter_name("sandfleet-admin")
    with pytest.raises(ValueError, match="reserved"):
        roles.check_submitter_name("guest")
    with pytest.raises(ValueError, match="not a submitter name"):
        roles.check_submitter_name("alice:pw@x")
    assert roles.check_submitter_name("alice@lab.example") == "alice@lab.example"


def test_job_output_is_written_by_its_hosts_worker_and_read_by_submitters_and_observers() -> None:
    worker = roles.worker("gpu-1", ["docker", "vm"])
    assert allows(worker.write, "sandfleet.logs") and not allows(worker.read, "sandfleet.logs.log")
    assert allows(worker.logs_write, "docker.gpu-1") and allows(worker.logs_write, "vm.gpu-1")
    for key in ("docker.gpu-2", "docker.gpu-1x", "podman.gpu-1", "log-marker.ab", "docker"):
        assert not allows(worker.logs_write, key), key
    for role in (roles.submitter(), roles.observer()):
        assert allows(role.read, "sandfleet.logs.log") and allows(role.write, "sandfleet.logs")
        assert allows(role.logs_write, "log-marker." + "0" * 32)
        assert not allows(role.logs_write, "docker.gpu-1")
    assert set(roles.admin().topic_permissions()) == {"sandfleet.events", "sandfleet.logs"}
