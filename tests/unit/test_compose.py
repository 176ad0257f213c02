"""compose.yaml cannot be run here (no image registry); check it parses and is coherent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_deploys_broker_gateway_and_docker_worker_with_health_checks() -> None:
    services = load()["services"]
    assert set(services) >= {"rabbitmq", "gateway", "docker-worker"}
    for name in ("rabbitmq", "gateway", "docker-worker"):
        assert "healthcheck" in services[name], name
    assert services["gateway"]["command"] == ["gateway"]
    assert services["docker-worker"]["command"][:3] == ["worker", "--driver", "docker"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["docker-worker"]["volumes"]
    assert (ROOT / "Dockerfile").is_file()


def test_uses_only_settings_the_code_knows() -> None:
    known = {f"SANDFLEET_{name.upper()}" for name in Settings.model_fields}
    used = {
        key
        for service in load()["services"].values()
        for key in (service.get("environment") or {})
        if key.startswith("SANDFLEET_")
    }
    assert used, "the services configure nothing through SANDFLEET_* settings"
    assert used <= known, f"unknown settings: {sorted(used - known)}"


def test_contract_settings_exist_with_their_defaults() -> None:
    settings = Settings(host="h")
    assert settings.broker_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.default_driver.value == "docker"
    assert settings.cdi_kind == "nvidia.com/gpu"
    assert str(settings.state_dir) == "/run/sandfleet"
    assert settings.docker_url == "unix:///var/run/docker.sock"
    assert settings.podman_url == "unix:///run/podman/podman.sock"
    assert settings.libvirt_uri == "qemu:///system"
    assert settings.gpu_inventory is None
