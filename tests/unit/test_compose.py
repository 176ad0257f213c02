"""compose.yaml cannot be run here (no image registry); check it parses and is coherent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from sandfleet.common.settings import Settings
from sandfleet.gateway.operator_cli import BrokerAdminSettings
from sandfleet.workers import registry
from sandfleet.workers.drivers.docker.plugin import DockerSettings
from sandfleet.workers.drivers.podman.plugin import PodmanSettings
from sandfleet.workers.drivers.vm.plugin import VmSettings

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


@pytest.mark.parametrize("name", ["gateway", "docker-worker"])
def test_sandfleet_services_check_their_own_healthz(name: str) -> None:
    """Not a socket to the broker: /healthz says 503 while the process is not consuming."""
    service = load()["services"][name]
    port = service["environment"]["SANDFLEET_METRICS_PORT"]
    command = service["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    assert f"urlopen('http://127.0.0.1:{port}/healthz'" in command[3]
    assert "socket" not in command[3]


def env_names(settings_type: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (upper case)."""
    prefix = str(settings_type.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings_type.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def known_settings() -> set[str]:
    """Every SANDFLEET_* variable of the runtime, of `broker setup` and of each registered
    driver."""
    kinds: list[type[BaseSettings]] = [Settings, BrokerAdminSettings]
    kinds += [registry.load(name).settings for name in registry.installed()]
    return {name for kind in kinds for name in env_names(kind)}


def test_uses_only_settings_the_code_knows() -> None:
    known = known_settings()
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
    assert settings.default_driver == "docker"
    assert settings.cdi_kind == "nvidia.com/gpu"
    assert str(settings.state_dir) == "/run/sandfleet"
    assert settings.gpu_inventory is None
    assert DockerSettings().url == "unix:///var/run/docker.sock"
    assert PodmanSettings().url == "unix:///run/podman/podman.sock"
    assert VmSettings().libvirt_uri == "qemu:///system"


def test_driver_settings_keep_their_design_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDFLEET_DOCKER_URL", "unix:///d.sock")
    monkeypatch.setenv("SANDFLEET_PODMAN_URL", "unix:///p.sock")
    monkeypatch.setenv("SANDFLEET_LIBVIRT_URI", "test:///default")
    monkeypatch.setenv("SANDFLEET_IMAGE_PULL_TIMEOUT_SECONDS", "7")
    assert (DockerSettings().url, DockerSettings().pull_timeout_seconds) == ("unix:///d.sock", 7)
    assert (PodmanSettings().url, PodmanSettings().pull_timeout_seconds) == ("unix:///p.sock", 7)
    assert VmSettings().libvirt_uri == "test:///default"
    expected = {"SANDFLEET_DOCKER_URL", "SANDFLEET_LIBVIRT_URI", "SANDFLEET_VM_WORK_DIR"}
    assert expected <= known_settings()


def test_each_role_has_its_own_account_and_only_the_gateway_holds_the_signing_key() -> None:
    services = load()["services"]
    credentials = {
        name: [v for v in services[name]["volumes"] if v.endswith("credentials:/credentials:ro")]
        for name in ("gateway", "docker-worker", "submit")
    }
    # each reads its own URL, from a volume only it mounts
    assert [len(found) for found in credentials.values()] == [1, 1, 1], credentials
    assert len({found[0] for found in credentials.values()}) == 3, credentials
    for name in credentials:
        assert services[name]["environment"]["SANDFLEET_BROKER_URL_FILE"] == "/credentials/url"
    assert all(
        "SANDFLEET_BROKER_URL" not in (service.get("environment") or {})
        for name, service in services.items()
        if name != "init"
    )
    assert services["gateway"]["environment"]["SANDFLEET_SIGNING_KEY"].startswith("/keys/")
    assert "signing-key:/keys:ro" in services["gateway"]["volumes"]
    worker = services["docker-worker"]
    assert worker["environment"]["SANDFLEET_TRUSTED_KEYS"] == "/trusted"
    assert not any(volume.startswith("signing-key:") for volume in worker["volumes"])
    assert "broker setup" in services["init"]["command"][0]
