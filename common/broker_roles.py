"""The fleet's roles and what the broker lets each do: one RabbitMQ user per role.

RabbitMQ checks three regular expressions per user and vhost (configure, write, read;
a resource is an exchange or a queue, by name) and, on topic exchanges, two more over
routing keys. sandfleet publishes only through named exchanges, never amq.default
(which reaches every queue), so these decide who writes where:

  gateway     declares the shared topology; consumes sandfleet.submit; publishes jobs,
              events, cancellations and replies. Trusted: it signs the jobs.
  worker H    consumes its drivers' shared queues and its host's queues (declares and
              binds nothing); publishes jobs back to sandfleet.jobs / sandfleet.retry,
              and events only under routing keys `<phase>.<driver>.H` (never accepted).
  submitter   publishes submissions and cancellation requests to the gateway
              (sandfleet.submissions), questions to the job views (sandfleet.queries)
              and log markers; reads the event log; nothing else.
  observer    reads the event log (and writes the markers that find its end); asks the
              job views (sandfleet.queries).
  admin       everything in the fleet's vhost (set-up, repairs, cancelling any job).

The rules for what each needs are measured against a real broker in
tests/integration/test_broker_roles.py; SECURITY.md explains them for operators.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sandfleet.common.events import Phase
from sandfleet.common.models import DRIVER_NAME_PATTERN, HOST_NAME_PATTERN
from sandfleet.common.topology import EVENTS_EXCHANGE, LOG_MARKER_KEY_PREFIX, LOGS_EXCHANGE

GATEWAY_USER = "sandfleet-gateway"
OBSERVER_USER = "sandfleet-observer"
ADMIN_USER = "sandfleet-admin"
WORKER_USER_PREFIX = "sandfleet-worker-"
# Logins starting so belong to the roles above; a submitter may not take one.
RESERVED_LOGIN_PREFIX = "sandfleet-"
SUBMITTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$"

NOTHING = "^$"
EVERYTHING = ".*"
# Markers carry a uuid4().hex (common.stream_follower).
_MARKER_KEYS = f"^{re.escape(LOG_MARKER_KEY_PREFIX)}[0-9a-f]{{32}}$"
_SHARED = (
    r"submit|submissions|jobs|retry|dead|events|events\.log|heartbeats\.log|control|control\.log"
    r"|queries|view|logs|logs\.log"
)
WORKER_PHASES = "|".join(phase.value for phase in Phase if phase not in (Phase.ACCEPTED,))


@dataclass(frozen=True)
class Permissions:
    """A user's permissions in the fleet's vhost; `events_*` are its topic permissions
    on sandfleet.events, `logs_*` those on sandfleet.logs (every user gets both: with
    none on an exchange, RabbitMQ allows every key there)."""

    configure: str
    write: str
    read: str
    events_write: str = NOTHING
    events_read: str = NOTHING
    logs_write: str = NOTHING
    logs_read: str = NOTHING

    def topic_permissions(self) -> dict[str, tuple[str, str]]:
        """(write, read) routing-key patterns per topic exchange."""
        return {
            EVENTS_EXCHANGE: (self.events_write, self.events_read),
            LOGS_EXCHANGE: (self.logs_write, self.logs_read),
        }


def gateway() -> Permissions:
    return Permissions(
        configure=rf"^sandfleet\.({_SHARED})$",
        write=rf"^amq\.default$|^sandfleet\.({_SHARED})$",  # replies go by amq.default
        read=rf"^sandfleet\.({_SHARED})$",
        events_write=EVERYTHING,
        events_read=EVERYTHING,
        logs_write=EVERYTHING,
        logs_read=EVERYTHING,
    )


def worker(host: str, drivers: Sequence[str]) -> Permissions:
    """A worker account for host `host`, serving any of `drivers` there."""
    if re.fullmatch(HOST_NAME_PATTERN, host) is None:
        raise ValueError(f"{host!r} is not a host name (letters, digits, _ and -)")
    for driver in drivers:
        if re.fullmatch(DRIVER_NAME_PATTERN, driver) is None:
            raise ValueError(f"{driver!r} is not a driver name")
    if not drivers:
        raise ValueError("a worker account needs at least one driver")
    names = "|".join(re.escape(d) for d in drivers)
    return Permissions(
        # Nothing: its queues are declared and bound by `broker setup`. Binding needs
        # only write on the queue and read on the exchange, so a worker that could bind
        # its own queue could bind it to another host's routing key and read its jobs.
        configure=NOTHING,
        # publish: jobs back to its host's queue (sandfleet.jobs) or its retry queue
        # (sandfleet.retry), events, the control log's markers
        write=r"^sandfleet\.(jobs|retry|events|control|logs)$",
        # consume: its drivers' shared queues and its own; the control log
        read=rf"^sandfleet\.jobs\.({names})(\.{re.escape(host)})?$|^sandfleet\.control\.log$",
        # the phases a worker reports (never `accepted`: the gateway's word, which the
        # job index takes a job id's owner from), for its own host only
        events_write=rf"^({WORKER_PHASES})\.({names})\.{re.escape(host)}$",
        # its jobs' output, for its own host only
        logs_write=rf"^({names})\.{re.escape(host)}$",
    )


def submitter() -> Permissions:
    return Permissions(
        configure=NOTHING,
        # sandfleet.queries only: the gateways alone consume sandfleet.view, so nobody
        # reads another's questions or answers in their place
        write=r"^sandfleet\.(submissions|events|queries|logs)$",
        read=r"^sandfleet\.(events|heartbeats|logs)\.log$",
        events_write=_MARKER_KEYS,
        logs_write=_MARKER_KEYS,
    )


def observer() -> Permissions:
    return Permissions(
        configure=NOTHING,
        write=r"^sandfleet\.(events|queries|logs)$",  # events, logs: markers only (*_write)
        read=r"^sandfleet\.(events|heartbeats|logs)\.log$",
        events_write=_MARKER_KEYS,
        logs_write=_MARKER_KEYS,
    )


def admin() -> Permissions:
    return Permissions(
        configure=EVERYTHING,
        write=EVERYTHING,
        read=EVERYTHING,
        events_write=EVERYTHING,
        events_read=EVERYTHING,
        logs_write=EVERYTHING,
        logs_read=EVERYTHING,
    )


def worker_user(host: str) -> str:
    return f"{WORKER_USER_PREFIX}{host}"


def check_submitter_name(name: str) -> str:
    """`name` as a submitter's login; ValueError if it is not one."""
    if re.fullmatch(SUBMITTER_NAME_PATTERN, name) is None:
        raise ValueError(f"{name!r} is not a submitter name (letters, digits, _ . @ and -)")
    if name.startswith(RESERVED_LOGIN_PREFIX) or name == "guest":
        raise ValueError(f"{name!r} is reserved (logins starting {RESERVED_LOGIN_PREFIX!r})")
    return name
