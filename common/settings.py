"""Settings every sandfleet process reads from the environment (`SANDFLEET_` prefix).

The names in DESIGN.md are a contract with operators and deployment files. A driver's
own settings (`SANDFLEET_<NAME>_*`, e.g. `SANDFLEET_DOCKER_URL`) belong to the driver's
package, not to this class: see `sandfleet.workers.drivers.base.DriverPlugin`.
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sandfleet.common.broker_urls import check_broker_urls
from sandfleet.common.models import DRIVER_NAME_PATTERN


def _short_hostname() -> str:
    # Host names are routing-key words; a dotted FQDN would split into several.
    return socket.gethostname().split(".", 1)[0] or "localhost"


class SandboxPolicy(StrEnum):
    """What a worker does with running sandboxes it lets go of or takes over."""

    ADOPT = "adopt"
    STOP = "stop"


class GpuUnhealthyAction(StrEnum):
    """What a worker does with a running job whose GPU turns unhealthy."""

    NOTE = "note"  # a `running` event, reason GpuUnhealthy; the job runs on
    STOP = "stop"  # that note, then the job is stopped and fails, reason GpuUnhealthy


# The most requests one batch submission may carry, whatever SANDFLEET_MAX_BATCH says.
MAX_BATCH_CEILING = 10_000

# Ten years: far past any job, far short of what datetime and the runtimes' clocks can hold.
MAX_TIMEOUT_CEILING_SECONDS = 10 * 365 * 86400

# RabbitMQ's x-max-age units (Y, M, D, h, m, s), as seconds.
_AGE_UNITS = {"Y": 365 * 86400, "M": 30 * 86400, "D": 86400, "h": 3600, "m": 60, "s": 1}
MAX_AGE_PATTERN = r"^[0-9]{1,9}[YMDhms]$"


def max_age_seconds(max_age: str) -> float:
    """`7D` → 604800.0: a stream's x-max-age in seconds."""
    if re.fullmatch(MAX_AGE_PATTERN, max_age) is None:
        raise ValueError(f"{max_age!r} is not a RabbitMQ max age (examples: 7D, 12h, 90m)")
    return float(int(max_age[:-1]) * _AGE_UNITS[max_age[-1]])


class Settings(BaseSettings):
    # Inputs stay out of error messages: a broker URL holds a password.
    model_config = SettingsConfigDict(
        env_prefix="SANDFLEET_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    # One URL, or a comma-separated list of one cluster's nodes (common/broker_urls.py).
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # A file holding the broker URL instead (its password stays out of the environment,
    # as with Docker secrets); read once, at start.
    broker_url_file: Path | None = None
    # TLS to the broker (amqps:// URLs only; see sandfleet.common.tls): the
    # CA certificates that sign the broker's (default: the system's), and a client
    # certificate with its key (default: in the certificate's file) for a broker that
    # asks for one.
    broker_ca: Path | None = None
    broker_cert: Path | None = None
    broker_key: Path | None = None
    host: str = Field(default_factory=_short_hostname, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
    default_driver: str = Field(default="docker", pattern=DRIVER_NAME_PATTERN)
    log_level: str = "INFO"

    # gateway
    max_message_bytes: int = Field(default=1 << 20, gt=0)
    max_driver_config_bytes: int = Field(default=64 << 10, gt=0)
    # Submissions admitted at once (the submission queue's prefetch): each waits on its
    # broker confirms, so more in flight means more confirms awaited together.
    gateway_concurrency: int = Field(default=64, gt=0, le=65535)
    # Events published together go into the log packed, one message per routing key
    # (common.event_batches); false: one message per event, for consumers of
    # sandfleet.events other than sandfleet's own readers that expect nothing else.
    pack_events: bool = True
    # The most requests one batch submission ({"jobs": [...]}) may carry.
    max_batch: int = Field(default=1000, gt=0, le=MAX_BATCH_CEILING)
    # The longest `template.timeout_seconds` a request may ask for; a job with no timeout
    # still runs unbounded. Capped itself so that no deadline overflows clock arithmetic.
    max_timeout_seconds: int = Field(default=7 * 86400, gt=0, le=MAX_TIMEOUT_CEILING_SECONDS)

    # workers
    gpu_inventory: Path | None = None
    cdi_kind: str = "nvidia.com/gpu"
    state_dir: Path = Path("/run/sandfleet")
    # Jobs this host has taken on; on a disk that survives a reboot, unlike state_dir.
    journal_dir: Path = Path("/var/lib/sandfleet/journal")
    # How long a finished job's entry stays, to recognise late duplicate deliveries.
    journal_retention_seconds: float = Field(default=7 * 86400, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    reconcile_seconds: float = Field(default=30.0, gt=0)
    gpu_retry_seconds: float = Field(default=10.0, gt=0)
    gpu_max_wait_seconds: float = Field(default=3600.0, ge=0)
    output_tail_lines: int = Field(default=50, gt=0)
    stop_grace_seconds: float = Field(default=5.0, ge=0)
    # A running job whose GPU turns unhealthy (a critical Xid, a GPU that stopped
    # answering, `sandfleet.workers.gpu.health_watch`): "note" tells its events; "stop"
    # also stops it, failed with reason GpuUnhealthy. Drained GPUs' jobs run on either way.
    gpu_unhealthy_action: GpuUnhealthyAction = GpuUnhealthyAction.NOTE
    # The NVML health watcher: how long one wait for Xid events lasts, and so how often
    # each GPU is asked whether it still answers.
    gpu_health_seconds: float = Field(default=5.0, ge=0.1, le=300)
    # What a worker told to stop (SIGTERM) does with sandboxes still running after its
    # drain time: "adopt" leaves them running for the next worker on this host to adopt;
    # "stop" stops them and reports them `cancelled`.
    shutdown_policy: SandboxPolicy = SandboxPolicy.ADOPT
    # What a worker does with a sandbox still running (or created, not started) that it
    # finds for a job it takes over from a worker that is gone (killed, crashed, or shut
    # down with "adopt"): "adopt" watches it to its end; "stop" stops it and reports
    # it `cancelled` (reason StoppedOnTakeover). A sandbox that already ended is
    # reported as it ended either way.
    takeover_policy: SandboxPolicy = SandboxPolicy.ADOPT

    # trust (SECURITY.md)
    # gateway: the Ed25519 private key that signs every job and cancellation it publishes
    signing_key: Path | None = None
    # workers: public keys whose signatures they accept: comma-separated files or
    # directories (each `*.pub` in one); several at once while the gateway's key rotates
    trusted_keys: str = ""
    # workers: run jobs nobody signed (a worker with no trusted keys refuses to start
    # without this): for a single trusted machine only
    allow_unsigned_jobs: bool = False
    # gateway: broker logins that may cancel any job, not only their own
    admin_users: str = "sandfleet-admin"

    # metrics (gateway and workers): /metrics and /healthz over HTTP on this port (none:
    # off), bound to this address; loopback by default, since metrics name jobs.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_address: str = "127.0.0.1"
    # gateway: its job view (SQLite), kept from the event log; each gateway its own file
    view_path: Path = Path("/var/lib/sandfleet/gateway/view.sqlite3")

    # workers: warm pools, a JSON list of {"image", "count", "cpu", "memory",
    # "driver_config"} (sandfleet.workers.warm_profiles); `--warm IMAGE=N` adds more
    warm_pools: str = ""
    # topology
    job_delivery_limit: int = Field(default=5, gt=0)
    # How long the event and control logs keep history (RabbitMQ x-max-age).
    events_max_age: str = Field(default="7D", pattern=MAX_AGE_PATTERN)
    # How long the job log stream (sandfleet.logs.log) keeps jobs' output.
    logs_max_age: str = Field(default="7D", pattern=MAX_AGE_PATTERN)
    # workers: how much of one job's output they ship; past it, a truncation line
    max_log_bytes_per_job: int = Field(default=64 << 20, ge=0)

    @field_validator("broker_url")
    @classmethod
    def _broker_urls_of_one_cluster(cls, value: str) -> str:
        return check_broker_urls(value)

    @model_validator(mode="before")
    @classmethod
    def _broker_url_from_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("broker_url_file"):
            path = Path(data["broker_url_file"])
            try:
                data = {**data, "broker_url": path.read_text(encoding="utf-8").strip()}
            except OSError as exc:
                raise ValueError(f"SANDFLEET_BROKER_URL_FILE {path}: {exc.strerror}") from None
        return data

    @property
    def admin_logins(self) -> frozenset[str]:
        return frozenset(filter(None, (name.strip() for name in self.admin_users.split(","))))

    @property
    def events_max_age_seconds(self) -> float:
        return max_age_seconds(self.events_max_age)
