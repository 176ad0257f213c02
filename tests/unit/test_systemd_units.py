"""deploy/systemd: each unit passes `systemd-analyze verify`, and stops its worker without
stopping the worker's sandboxes, after the worker's drain."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandfleet.common.settings import Settings
from sandfleet.workers.cli import worker
from tests.support.settings_names import known_settings

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = sorted(path.name for path in SYSTEMD.glob("*.service"))
WORKER_RUNTIMES = {
    "sandfleet-worker-docker.service": "docker.service",
    "sandfleet-worker-podman.service": "podman.socket",
    "sandfleet-worker-vm.service": "libvirtd.service",
}
INSTALLED_AT = "/opt/sandfleet/bin/sandfleet"


def directives(unit: str) -> dict[str, list[str]]:
    """Each `Key=value` of the unit by key, in order (systemd allows a key many times)."""
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def one(unit: str, key: str) -> str:
    (value,) = directives(unit)[key]
    return value


def environment(unit: str) -> dict[str, str]:
    pairs = (entry.split("=", 1) for entry in directives(unit).get("Environment", []))
    return {name: value for name, value in pairs}


def test_a_gateway_unit_and_one_per_worker_kind() -> None:
    assert ["sandfleet-gateway.service", *sorted(WORKER_RUNTIMES)] == UNITS


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verifies_the_unit(unit: str, tmp_path: Path) -> None:
    """The unit as shipped, but for ExecStart's binary: verify insists that it exists, and
    here it is the venv's `sandfleet` (the same program as /opt/sandfleet/bin/sandfleet)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed"
    here = Path(sys.executable).parent / "sandfleet"
    assert here.is_file(), here
    text = (SYSTEMD / unit).read_text()
    assert text.count(f"ExecStart={INSTALLED_AT} ") == 1, "ExecStart names another binary"
    (tmp_path / unit).write_text(text.replace(f"ExecStart={INSTALLED_AT} ", f"ExecStart={here} "))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # verify exits 0 on a directive it ignores (a typo, a bad value): its warnings count too.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_restarts_on_failure_and_signals_the_main_process_alone(unit: str) -> None:
    assert one(unit, "Restart") == "on-failure"
    # mixed: SIGTERM to the worker only, so it can drain; SIGKILL to what is left of its
    # cgroup only after TimeoutStopSec. Sandboxes are in their runtime's cgroups anyway.
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "EnvironmentFile") == "/etc/sandfleet/sandfleet.env"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match is not None, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def drain_seconds(exec_start: str) -> float:
    """The worker's --drain-seconds: as ExecStart gives it, else the command's default."""
    given = re.search(r"--drain-seconds[ =](\S+)", exec_start)
    if given is not None:
        return float(given[1])
    default = inspect.signature(worker).parameters["drain_seconds"].default
    assert isinstance(default, float)
    return default


@pytest.mark.parametrize("unit", sorted(WORKER_RUNTIMES))
def test_a_worker_has_time_to_drain_and_then_stop_its_sandboxes(unit: str) -> None:
    drain = drain_seconds(one(unit, "ExecStart"))
    # After the drain, SANDFLEET_SHUTDOWN_POLICY=stop stops what is left, each in up to
    # stop_grace_seconds, before the last events go out.
    needed = drain + Settings(host="h").stop_grace_seconds
    assert seconds(one(unit, "TimeoutStopSec")) > needed


@pytest.mark.parametrize(("unit", "runtime"), sorted(WORKER_RUNTIMES.items()))
def test_a_worker_starts_after_its_runtime(unit: str, runtime: str) -> None:
    assert runtime in one(unit, "After").split()
    assert runtime in one(unit, "Wants").split()
    driver = unit.removeprefix("sandfleet-worker-").removesuffix(".service")
    assert f"--driver {driver} " in one(unit, "ExecStart")


@pytest.mark.parametrize("unit", sorted(WORKER_RUNTIMES))
def test_a_worker_may_write_the_claim_store_and_journal_where_the_settings_put_them(
    unit: str,
) -> None:
    """ProtectSystem=strict leaves only these writable; RuntimeDirectory= is /run/…,
    StateDirectory= /var/lib/…, and the claim store outlives a worker's restart."""
    settings = Settings(host="h")
    assert Path("/run", one(unit, "RuntimeDirectory")) == settings.state_dir
    assert one(unit, "RuntimeDirectoryPreserve") == "yes"
    states = [Path("/var/lib", d) for d in directives(unit)["StateDirectory"]]
    assert settings.journal_dir in states
    env = environment(unit)
    assert "SANDFLEET_STATE_DIR" not in env and "SANDFLEET_JOURNAL_DIR" not in env
    if "SANDFLEET_VM_WORK_DIR" in env:
        assert Path(env["SANDFLEET_VM_WORK_DIR"]) in states


@pytest.mark.parametrize("unit", UNITS)
def test_secrets_come_from_credentials_not_the_environment(unit: str) -> None:
    env = environment(unit)
    assert env["SANDFLEET_BROKER_URL_FILE"] == "%d/broker-url"
    credentials = directives(unit)["LoadCredential"]
    assert any(c.startswith("broker-url:/etc/sandfleet/") for c in credentials)
    assert "SANDFLEET_BROKER_URL" not in env


def example_settings() -> dict[str, str]:
    lines = (SYSTEMD / "sandfleet.env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if re.match(r"^#?SANDFLEET_\w+=", line))
    return {name.lstrip("#"): value for name, value in pairs}


def test_units_and_env_example_set_only_settings_the_code_knows() -> None:
    used = set(example_settings())
    used |= {name for unit in UNITS for name in environment(unit) if name.startswith("SANDFLEET_")}
    assert used <= known_settings(), sorted(used - known_settings())


def test_env_example_names_the_host_and_holds_no_secret() -> None:
    settings = example_settings()
    assert "SANDFLEET_HOST" in settings
    assert not any(name.startswith("SANDFLEET_BROKER_URL") for name in settings)
    assert not re.search(r"://[^/@\s:]+:[^/@\s]+@", (SYSTEMD / "sandfleet.env.example").read_text())
