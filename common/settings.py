"""Settings every sandfleet process reads from the environment (`SANDFLEET_` prefix).

The names in DESIGN.md are a contract with operators and deployment files.
"""

from __future__ import annotations

import socket
from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.models import Driver


def _short_hostname() -> str:
    # Host names are routing-key words; a dotted FQDN would split into several.
    return socket.gethostname().split(".", 1)[0] or "localhost"


class SandboxPolicy(StrEnum):
    """What a worker does with running sandboxes it lets go of or takes over."""

    ADOPT = "adopt"
    STOP = "stop"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SANDFLEET_", frozen=True, extra="ignore")

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    host: str = Field(default_factory=_short_hostname, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
    default_driver: Driver = Driver.DOCKER
    log_level: str = "INFO"

    # gateway
    max_message_bytes: int = Field(default=1 << 20, gt=0)
    max_driver_config_bytes: int = Field(default=64 << 10, gt=0)
    gateway_concurrency: int = Field(default=64, gt=0)

    # workers
    gpu_inventory: Path | None = None
    cdi_kind: str = "nvidia.com/gpu"
    state_dir: Path = Path("/run/sandfleet")
    # Jobs this host has taken on; on a disk that survives a reboot, unlike state_dir.
    journal_dir: Path = Path("/var/lib/sandfleet/journal")
    # How long a finished job's entry stays, to recognise late duplicate deliveries.
    journal_retention_seconds: float = Field(default=7 * 86400, gt=0)
    docker_url: str = "unix:///var/run/docker.sock"
    podman_url: str = "unix:///run/podman/podman.sock"
    libvirt_uri: str = "qemu:///system"
    # kvm on real hosts; qemu (TCG) where nested KVM guests hang, as on CI machines
    vm_domain_type: str = Field(default="kvm", pattern=r"^(kvm|qemu|test)$")
    vm_work_dir: Path = Path("/var/lib/sandfleet/vm")
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    reconcile_seconds: float = Field(default=30.0, gt=0)
    gpu_retry_seconds: float = Field(default=10.0, gt=0)
    gpu_max_wait_seconds: float = Field(default=3600.0, ge=0)
    output_tail_lines: int = Field(default=50, gt=0)
    image_pull_timeout_seconds: float = Field(default=300.0, gt=0)
    stop_grace_seconds: float = Field(default=5.0, ge=0)
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

    # topology
    job_delivery_limit: int = Field(default=5, gt=0)
    events_max_age: str = "7D"
