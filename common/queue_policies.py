"""The queue limits an operator may change on a live fleet, as RabbitMQ policies.

A limit baked into a queue's arguments can never change: declaring the queue again with
another value is refused (406 PRECONDITION_FAILED), so a new setting would need every
queue deleted, jobs and history with it. A policy changes a live queue at once. So the
queues are declared with only what the code's correctness rests on (common.topology:
queue types, dead-letter wiring, overflow behaviour, a query's TTL, replica counts) and
`sandfleet broker setup` applies these policies, re-applying them on every run: change
SANDFLEET_JOB_DELIVERY_LIMIT, SANDFLEET_EVENTS_MAX_AGE or SANDFLEET_LOGS_MAX_AGE and run
it again.

RabbitMQ applies at most one policy to a queue, the highest priority's, and does not
merge definitions: each queue group has one policy, whose pattern matches its queues'
exact names and nothing else, carrying every key its queues need. An operator overrides
one by editing it (the next `broker setup` puts sandfleet's values back), by a policy of
higher priority for the same queues (which replaces sandfleet's whole definition, so it
must repeat every key it keeps), or by an *operator policy*, which merges with it, the
lower value winning (RabbitMQ 3.10 takes delivery-limit, max-length and max-length-bytes
there, not a stream's max-age). A limit set both as a queue argument (by a release
before policies) and by a policy is likewise the lower of the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CONTROL_LOG_QUEUE,
    CONTROL_MAX_LENGTH_BYTES,
    DEAD_MAX_LENGTH_BYTES,
    DEAD_QUEUE,
    EVENTS_LOG_QUEUE,
    EVENTS_MAX_LENGTH_BYTES,
    HEARTBEATS_LOG_QUEUE,
    HEARTBEATS_MAX_AGE,
    HEARTBEATS_MAX_LENGTH_BYTES,
    JOBS_EXCHANGE,
    LOGS_LOG_QUEUE,
    LOGS_MAX_LENGTH_BYTES,
    RETRY_PREFIX,
    SUBMIT_QUEUE,
    VIEW_MAX_LENGTH,
    VIEW_QUEUE,
)

# Above a catch-all policy an operator may already have (priority 0), so sandfleet's
# queues keep their limits; below anything an operator sets on purpose to override them.
POLICY_PRIORITY = 10
# Spreads quorum queues' and streams' leaders over a cluster's nodes.
LEADER_LOCATOR = "balanced"

PolicyValue = str | int


@dataclass(frozen=True)
class QueuePolicy:
    """One RabbitMQ policy, as `PUT /api/policies/{vhost}/{name}` takes it."""

    name: str
    pattern: str
    definition: dict[str, PolicyValue]
    priority: int = POLICY_PRIORITY

    def as_json(self) -> dict[str, object]:
        return {
            "pattern": self.pattern,
            "apply-to": "queues",
            "priority": self.priority,
            "definition": dict(self.definition),
        }


def fleet_policies(settings: Settings) -> list[QueuePolicy]:
    """Every sandfleet queue's policy, with the limits from `settings` and topology's caps."""
    replicated: dict[str, PolicyValue] = {"queue-leader-locator": LEADER_LOCATOR}
    return [
        QueuePolicy(
            "sandfleet-intake",
            # The submit queue and every job queue, sandfleet.jobs.<driver>[.<host>].
            f"^(?:{re.escape(SUBMIT_QUEUE)}|{re.escape(JOBS_EXCHANGE + '.')}.+)$",
            {"delivery-limit": settings.job_delivery_limit, **replicated},
        ),
        QueuePolicy("sandfleet-retry", f"^{re.escape(RETRY_PREFIX + '.')}.+$", replicated),
        QueuePolicy(
            "sandfleet-dead",
            _exactly(DEAD_QUEUE),
            {"max-length-bytes": DEAD_MAX_LENGTH_BYTES, **replicated},
        ),
        QueuePolicy(
            "sandfleet-view", _exactly(VIEW_QUEUE), {"max-length": VIEW_MAX_LENGTH, **replicated}
        ),
        _log_policy(EVENTS_LOG_QUEUE, settings.events_max_age, EVENTS_MAX_LENGTH_BYTES),
        _log_policy(HEARTBEATS_LOG_QUEUE, HEARTBEATS_MAX_AGE, HEARTBEATS_MAX_LENGTH_BYTES),
        _log_policy(CONTROL_LOG_QUEUE, settings.events_max_age, CONTROL_MAX_LENGTH_BYTES),
        _log_policy(LOGS_LOG_QUEUE, settings.logs_max_age, LOGS_MAX_LENGTH_BYTES),
    ]


def _log_policy(stream: str, max_age: str, max_length_bytes: int) -> QueuePolicy:
    """A stream's retention: the oldest segments go past either bound."""
    return QueuePolicy(
        stream.replace(".", "-"),
        _exactly(stream),
        {
            "max-age": max_age,
            "max-length-bytes": max_length_bytes,
            "queue-leader-locator": LEADER_LOCATOR,
        },
    )


def _exactly(name: str) -> str:
    return f"^{re.escape(name)}$"
