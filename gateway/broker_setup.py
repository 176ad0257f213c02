"""`sandfleet broker setup`: one broker user per role, least privilege, and the queues'
policies (common.queue_policies), through RabbitMQ's management HTTP API; then the shared
topology, declared as the fleet's admin.

Idempotent: a user that exists keeps its password (kept in a credentials file, 0600,
since RabbitMQ stores only hashes) unless `rotate`; new names add users. The URLs it
returns are the fleet's broker URL with each role's login in it. The policies are put
again on every run, so a changed limit setting reaches the live queues.

A gateway or worker on a broker nobody ran this on (a development broker's guest)
declares the queues itself and works, but its queues have none of these limits: no
delivery limit (a message that crashes its consumer is redelivered for ever), no
retention on the logs, no caps on the dead and view queues. Nothing over AMQP tells a
process which policy is in force, so it cannot warn: run this on any broker that lives.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from sandfleet.common import broker_roles as roles
from sandfleet.common.amqp import connect, redacted_url
from sandfleet.common.broker_urls import split_broker_urls, vhost_of
from sandfleet.common.errors import SandfleetError
from sandfleet.common.queue_policies import QueuePolicy, fleet_policies
from sandfleet.common.settings import Settings
from sandfleet.common.tls import tls_context
from sandfleet.common.topology import declare_job_queue, declare_topology

DEFAULT_ADMIN_URL = "http://guest:guest@127.0.0.1:15672/"
HTTP_TIMEOUT_SECONDS = 30.0


class BrokerSetupFailed(SandfleetError):
    """The management API refused or could not be reached; the message says which."""


@dataclass
class FleetUsers:
    """What `broker setup` made: each role's AMQP URL."""

    gateway: str
    observer: str
    admin: str
    workers: dict[str, str] = field(default_factory=dict)
    submitters: dict[str, str] = field(default_factory=dict)
    # The queue policies put in the fleet's vhost.
    policies: list[QueuePolicy] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "observer": self.observer,
            "admin": self.admin,
            "workers": dict(self.workers),
            "submitters": dict(self.submitters),
            "policies": {policy.name: policy.as_json() for policy in self.policies},
        }


class CredentialsFile:
    """The passwords `broker setup` gave out: {login: password}, 0600 in a 0700 folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, str]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd) as file:
            data = json.load(file)
        return {str(k): str(v) for k, v in data.get("passwords", {}).items()}

    def write(self, passwords: dict[str, str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump({"passwords": passwords}, file, indent=2, sort_keys=True)
        os.replace(temporary, self.path)


class ManagementApi:
    """The few calls of RabbitMQ's management HTTP API that set-up needs."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    async def put(self, path: str, body: dict[str, Any]) -> None:
        await self._call("PUT", path, body)

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`; None if there is none."""
        return await self._call("GET", path, None, missing_ok=True)

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, missing_ok: bool = False
    ) -> dict[str, Any] | None:
        url = f"{self._base}/api/{path}"
        try:
            async with self._session.request(method, url, json=body) as response:
                if response.status == 404 and missing_ok:
                    return None
                if response.status >= 300:
                    detail = (await response.text())[:300]
                    raise BrokerSetupFailed(
                        f"the management API answered {response.status} to {method} /api/{path}: "
                        f"{detail}"
                    )
                found = await response.json() if method == "GET" else {}
                return found if isinstance(found, dict) else {}
        except aiohttp.ClientConnectionError as exc:
            raise BrokerSetupFailed(
                f"no RabbitMQ management API at {redacted_url(self._base)} ({exc}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`"
            ) from None


async def set_up_broker(
    settings: Settings,
    *,
    admin_url: str,
    credentials: CredentialsFile,
    hosts: Sequence[str] = (),
    submitters: Sequence[str] = (),
    drivers: Sequence[str] = (),
    rotate: bool = False,
) -> FleetUsers:
    """Create (idempotently) the fleet's vhost, every role's user and its permissions,
    put the queues' policies, then declare the shared topology, each driver's shared
    queue and each host's queues as the admin."""
    for name in submitters:
        roles.check_submitter_name(name)
    vhost = vhost_of(settings.broker_url)
    wanted = _role_permissions(hosts, submitters, drivers)
    passwords = credentials.read()
    async with _management(admin_url, settings) as api:
        await _refuse_foreign_users(api, wanted, known=passwords)
        for login in wanted:
            if rotate or login not in passwords:
                passwords[login] = secrets.token_urlsafe(24)
        credentials.write(passwords)  # before the broker has them: never a password lost
        await _apply(api, vhost, wanted, passwords)
        policies = await put_policies(api, vhost, fleet_policies(settings))
    urls = {login: _url_for(settings.broker_url, login, passwords[login]) for login in wanted}
    await _declare(settings, urls[roles.ADMIN_USER], drivers, hosts)
    return FleetUsers(
        gateway=urls[roles.GATEWAY_USER],
        observer=urls[roles.OBSERVER_USER],
        admin=urls[roles.ADMIN_USER],
        workers={host: urls[roles.worker_user(host)] for host in hosts},
        submitters={name: urls[name] for name in submitters},
        policies=policies,
    )


async def apply_fleet_policies(settings: Settings, *, admin_url: str) -> list[QueuePolicy]:
    """Put the queues' policies, from `settings`, in its broker URL's vhost (which must
    exist): what `set_up_broker` does, alone."""
    async with _management(admin_url, settings) as api:
        return await put_policies(api, vhost_of(settings.broker_url), fleet_policies(settings))


async def put_policies(
    api: ManagementApi, vhost: str, policies: list[QueuePolicy]
) -> list[QueuePolicy]:
    """Each policy, created or replaced: a queue it matches takes the new definition at
    once, with no re-declaration and no restart."""
    vh = quote(vhost, safe="")
    for policy in policies:
        await api.put(f"policies/{vh}/{quote(policy.name, safe='')}", policy.as_json())
    return policies


def _role_permissions(
    hosts: Sequence[str], submitters: Sequence[str], drivers: Sequence[str]
) -> dict[str, roles.Permissions]:
    wanted = {
        roles.GATEWAY_USER: roles.gateway(),
        roles.OBSERVER_USER: roles.observer(),
        roles.ADMIN_USER: roles.admin(),
    }
    wanted.update({roles.worker_user(host): roles.worker(host, drivers) for host in hosts})
    wanted.update({name: roles.submitter() for name in submitters})
    return wanted


@asynccontextmanager
async def _management(admin_url: str, settings: Settings) -> AsyncIterator[ManagementApi]:
    parts = urlsplit(admin_url)
    # An https:// management API is checked as the broker is (SANDFLEET_BROKER_CA).
    tls = tls_context(settings) if parts.scheme == "https" else None
    login, password = unquote(parts.username or "guest"), unquote(parts.password or "")
    headers = {"Authorization": aiohttp.encode_basic_auth(login, password)}
    base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(ssl=tls) if tls is not None else None
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector
    ) as session:
        yield ManagementApi(session, base)


async def _refuse_foreign_users(
    api: ManagementApi, logins: Iterable[str], *, known: Mapping[str, str]
) -> None:
    """Never take over a user this set-up did not make: its password and tags would be
    overwritten (`--submitter admin` on a broker whose administrator is `admin`). A user
    with tags (a broker administrator) is never one of sandfleet's; nor is a submitter's
    name on the broker that this credentials file does not know. (The role logins,
    `sandfleet-*`, are sandfleet's own: a set-up from another credentials file resets
    their passwords, so keep one file per broker.)"""
    for login in logins:
        user = await api.get(f"users/{quote(login, safe='')}")
        if user is None:
            continue
        tags = user.get("tags") or []
        foreign = login not in known and not login.startswith(roles.RESERVED_LOGIN_PREFIX)
        if tags or foreign:
            why = f"it has tags {tags}" if tags else "it is not in SANDFLEET_BROKER_CREDENTIALS"
            raise BrokerSetupFailed(
                f"broker user {login!r} exists and is not one this set-up made ({why}): "
                "choose another name, or remove the user first"
            )


async def _apply(
    api: ManagementApi, vhost: str, wanted: dict[str, roles.Permissions], passwords: dict[str, str]
) -> None:
    vh = quote(vhost, safe="")
    await api.put(f"vhosts/{vh}", {})
    for login, permissions in wanted.items():
        user = quote(login, safe="")
        await api.put(f"users/{user}", {"password": passwords[login], "tags": ""})
        await api.put(
            f"permissions/{vh}/{user}",
            {
                "configure": permissions.configure,
                "write": permissions.write,
                "read": permissions.read,
            },
        )
        for exchange, (write, read) in permissions.topic_permissions().items():
            await api.put(
                f"topic-permissions/{vh}/{user}",
                {"exchange": exchange, "write": write, "read": read},
            )


async def _declare(
    settings: Settings, admin_amqp_url: str, drivers: Sequence[str], hosts: Sequence[str]
) -> None:
    """The shared topology, each driver's shared queue and each host's queues: a worker's
    account may declare (and so bind) nothing."""
    connection = await connect(admin_amqp_url, name="sandfleet-broker-setup", settings=settings)
    async with connection, connection.channel() as channel:
        await declare_topology(connection, channel)
        for driver in drivers:
            for host in (None, *hosts):
                await declare_job_queue(connection, channel, driver, host)


def _url_for(broker_url: str, login: str, password: str) -> str:
    """`broker_url` (each URL of a list) with `login` and `password` in it."""
    return ",".join(_node_url_for(node, login, password) for node in split_broker_urls(broker_url))


def _node_url_for(broker_url: str, login: str, password: str) -> str:
    parts = urlsplit(broker_url)
    host = parts.hostname or "127.0.0.1"
    hostport = f"[{host}]" if ":" in host else host
    if parts.port:
        hostport += f":{parts.port}"
    userinfo = f"{quote(login, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{hostport}"))
