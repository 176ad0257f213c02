"""The queue policies `sandfleet broker setup` puts: one per queue, from the settings."""

from __future__ import annotations

import re

import pytest

from sandfleet.common.queue_policies import QueuePolicy, fleet_policies
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CONTROL_LOG_QUEUE,
    DEAD_QUEUE,
    EVENTS_LOG_QUEUE,
    LOGS_LOG_QUEUE,
    SUBMIT_QUEUE,
    VIEW_QUEUE,
    job_queue_name,
    retry_queue_name,
)

EVERY_QUEUE = [
    SUBMIT_QUEUE,
    job_queue_name("docker"),
    job_queue_name("docker", "gpu-1"),
    retry_queue_name("docker.gpu-1"),
    DEAD_QUEUE,
    VIEW_QUEUE,
    EVENTS_LOG_QUEUE,
    CONTROL_LOG_QUEUE,
    LOGS_LOG_QUEUE,
]


def policies_of(queue: str, policies: list[QueuePolicy]) -> list[str]:
    # RabbitMQ matches a policy's pattern anywhere in the name, as re.search does.
    return [policy.name for policy in policies if re.search(policy.pattern, queue)]


@pytest.mark.parametrize("queue", EVERY_QUEUE)
def test_every_queue_has_exactly_one_policy(queue: str) -> None:
    """RabbitMQ applies one policy per queue and merges none: two matching would leave
    one's limits off."""
    assert len(policies_of(queue, fleet_policies(Settings()))) == 1


@pytest.mark.parametrize(
    "queue",
    ["sandfleet.submitted", "xsandfleet.dead", "sandfleet.dead.letters", "sandfleet.jobs",
     "sandfleetXevents.log", "my.sandfleet.view", "sandfleet.retry"],
)  # fmt: skip
def test_no_policy_reaches_a_queue_that_is_not_sandfleets(queue: str) -> None:
    assert policies_of(queue, fleet_policies(Settings())) == []


def test_the_limits_come_from_the_settings() -> None:
    settings = Settings(job_delivery_limit=9, events_max_age="3D", logs_max_age="12h")
    by_queue = {
        queue: next(p for p in fleet_policies(settings) if re.search(p.pattern, queue))
        for queue in EVERY_QUEUE
    }
    assert by_queue[SUBMIT_QUEUE].definition["delivery-limit"] == 9
    assert by_queue[job_queue_name("docker", "gpu-1")].definition["delivery-limit"] == 9
    assert by_queue[EVENTS_LOG_QUEUE].definition["max-age"] == "3D"
    assert by_queue[CONTROL_LOG_QUEUE].definition["max-age"] == "3D"
    assert by_queue[LOGS_LOG_QUEUE].definition["max-age"] == "12h"


def test_replicated_queues_spread_their_leaders() -> None:
    for queue in EVERY_QUEUE:
        [policy] = [p for p in fleet_policies(Settings()) if re.search(p.pattern, queue)]
        assert policy.definition["queue-leader-locator"] == "balanced", queue


def test_a_policy_is_what_the_management_api_takes() -> None:
    policy = fleet_policies(Settings())[0]
    assert policy.as_json() == {
        "pattern": policy.pattern,
        "apply-to": "queues",
        "priority": 10,
        "definition": policy.definition,
    }
