"""compose.yaml cannot be run here (no image registry): check that it parses, that
`docker-compose config` accepts it, and that it is coherent with the code's settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandfleet.common.settings import Settings
from sandfleet.workers.drivers.docker.plugin import DockerSettings
from sandfleet.workers.drivers.podman.plugin import PodmanSettings
from sandfleet.workers.drivers.vm.plugin import VmSettings
from tests.support.settings_names import known_settings

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def sandfleet_services() -> dict[str, dict[str, Any]]:
    """The services that run the sandfleet image (every one but the broker)."""
    return {
        name: service
        for name, service in load()["services"].items()
        if str(service.get("image", "")).startswith("sandfleet:")
    }


def worker_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in sandfleet_services().items()
        if service.get("command", [None])[0] == "worker"
    }


def test_deploys_broker_gateway_and_docker_worker_with_health_checks() -> None:
    services = load()["services"]
    assert set(services) >= {"rabbitmq", "gateway", "docker-worker"}
    for name in ("rabbitmq", "gateway", "docker-worker"):
        assert "healthcheck" in services[name], name
    assert services["gateway"]["command"] == ["gateway"]
    assert services["docker-worker"]["command"][:3] == ["worker", "--driver", "docker"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["docker-worker"]["volumes"]
    assert (ROOT / "Dockerfile").is_file()


@pytest.mark.parametrize("name", ["gateway", "docker-worker", "gpu-worker"])
def test_sandfleet_services_check_their_own_healthz(name: str) -> None:
    """Not a socket to the broker: /healthz says 503 while the process is not consuming."""
    service = load()["services"][name]
    port = service["environment"]["SANDFLEET_METRICS_PORT"]
    command = service["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    assert f"urlopen('http://127.0.0.1:{port}/healthz'" in command[3]
    assert "socket" not in command[3]


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


def test_every_sandfleet_service_is_built_from_the_dockerfile() -> None:
    services = sandfleet_services()
    assert {"init", "gateway", "docker-worker", "gpu-worker", "submit"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context == ".", f"{name}: build {build!r}"


def test_workers_require_their_host_name_with_no_fallback() -> None:
    """Two hosts under one fallback name would share one host queue and one account."""
    for name, service in worker_services().items():
        host = service["environment"]["SANDFLEET_HOST"]
        assert host.startswith("${SANDFLEET_HOST:?"), f"{name}: SANDFLEET_HOST={host}"
    assert load()["services"]["init"]["environment"]["WORKER_HOST"].startswith("${SANDFLEET_HOST:?")
    assert "HOSTNAME" not in (ROOT / "compose.yaml").read_text()


# user:password@ in a URL, or a *PASS*/*SECRET*/*TOKEN* variable with a value of its own.
URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN", re.IGNORECASE)


def test_no_credential_is_written_in_the_file() -> None:
    compose = load()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            assert not URL_WITH_PASSWORD.search(str(value)), f"{name}: {key}"
            assert not SECRET_NAME.search(key), f"{name}: {key} (use a secret file)"
    assert "rabbitmq-admin-password" in compose["services"]["rabbitmq"]["secrets"]
    assert "rabbitmq-admin-password" in compose["services"]["init"]["secrets"]
    assert set(compose["secrets"]["rabbitmq-admin-password"]) == {"file"}


def setting_path(service: dict[str, Any], setting: str) -> str:
    """Where the service's settings put `setting` (its environment, else the default)."""
    default = Settings.model_fields[setting.removeprefix("SANDFLEET_").lower()].default
    return str(service["environment"].get(setting, default))


@pytest.mark.parametrize("setting", ["SANDFLEET_STATE_DIR", "SANDFLEET_JOURNAL_DIR"])
def test_claims_and_journal_are_one_named_volume_per_host_at_the_settings_paths(
    setting: str,
) -> None:
    """Mounted where the worker looks, and the same volume for every worker of a host
    (they share the claims and the journal)."""
    named = set(load()["volumes"])
    mounted = set()
    for name, service in worker_services().items():
        path = setting_path(service, setting)
        sources = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == path]
        assert len(sources) == 1 and sources[0] in named, f"{name}: {path} from {sources}"
        mounted.add(sources[0])
    assert len(mounted) == 1, mounted


def test_gpu_worker_is_a_profile_with_nvml_and_a_gpu_reservation() -> None:
    worker = load()["services"]["gpu-worker"]
    assert worker["profiles"] == ["gpu"]
    assert "nvml" in worker["build"]["args"]["SANDFLEET_EXTRAS"].split(",")
    assert worker["image"] != load()["services"]["docker-worker"]["image"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG SANDFLEET_EXTRAS=", dockerfile, re.MULTILINE)
    assert "${SANDFLEET_EXTRAS:+[$SANDFLEET_EXTRAS]}" in dockerfile


def docker_compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Debian's docker-compose 1.29 (`apt-get install docker-compose`): required, not
    skipped, so that a machine without it fails here rather than passes unchecked."""
    binary = shutil.which("docker-compose")
    assert binary is not None, "docker-compose is not installed (apt-get install docker-compose)"
    clean = {k: v for k, v in os.environ.items() if k not in {"SANDFLEET_HOST", "DOCKER_GID"}}
    return subprocess.run(
        [binary, "--project-directory", str(ROOT), "-f", str(ROOT / "compose.yaml"), *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"], ["--profile", "tools"]])
def test_docker_compose_accepts_the_file(profile: list[str]) -> None:
    result = docker_compose(*profile, "config", "-q", SANDFLEET_HOST="gpu-01", DOCKER_GID="999")
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_start_without_a_host_name() -> None:
    result = docker_compose("config", "-q", DOCKER_GID="999")
    assert result.returncode != 0
    assert "set SANDFLEET_HOST to this machine's name" in result.stderr
