"""Real RabbitMQ, dockerd, podman and libvirtd for integration and fault tests
(started by ./dev setup or .ci/run).

Each test gets its own RabbitMQ vhost, so queues, streams and dead letters of one
test can never leak into another.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from tenacity import retry, stop_after_attempt, wait_fixed

from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.gateway.broker_setup import DEFAULT_ADMIN_URL, apply_fleet_policies
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from tests.support.hang_report import pytest_timeout_set_timer  # noqa: F401  (a hook)
from tests.support.runtimes import (
    CDI_DIR,
    CDI_SPEC,
    GUEST_DIR,
    ROOT,
    TEST_IMAGE,
    WorkerFactory,
    registered_driver,
    worker_factory,
)

hypothesis_settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@retry(stop=stop_after_attempt(3), wait=wait_fixed(1), reraise=True)
def _rabbitmqctl(*args: str) -> None:
    """rabbitmqctl, tried 3 times: under load it has failed once in a CI run (exit 64)
    and passed when run again. A vhost that an earlier try made counts as made."""
    command = ["rabbitmqctl", "-q", *args]
    done = subprocess.run(command, check=False, capture_output=True, timeout=60)
    if done.returncode != 0 and not (args[0] == "add_vhost" and b"already" in done.stderr):
        stderr = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: exit {done.returncode}: {stderr}")


@pytest.fixture(scope="session")
def test_image() -> str:
    if shutil.which("docker") is None:
        pytest.fail("docker CLI missing: run ./dev setup")
    subprocess.run(
        [ROOT / "scripts" / "make-busybox-image", "docker", TEST_IMAGE], check=True, timeout=120
    )
    return TEST_IMAGE


@pytest.fixture(scope="session")
def podman_image() -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}
    subprocess.run(
        [ROOT / "scripts" / "make-busybox-image", "podman", TEST_IMAGE],
        check=True,
        timeout=120,
        env=env,
    )
    return TEST_IMAGE


@pytest.fixture
def test_cdi_spec() -> Path:
    """The test CDI spec, installed where Podman and Docker look for specs, before each
    test that wants it.

    Written whole under a temporary name, then renamed over the old one, so a runtime
    resolving devices never reads half a file; and left in place afterwards (its
    devices are /dev/null): test sessions running side by side on one host share it,
    and one's removal failed another's GPU jobs with "unresolvable CDI devices"."""
    CDI_DIR.mkdir(parents=True, exist_ok=True)
    installed = CDI_DIR / CDI_SPEC.name
    partial = CDI_DIR / f".{CDI_SPEC.name}.{os.getpid()}"
    shutil.copyfile(CDI_SPEC, partial)
    partial.replace(installed)
    return installed


@pytest.fixture
def broker_url() -> AsyncIterator[str] | Any:
    """A vhost of its own, with the queue policies `sandfleet broker setup` puts (from
    default settings), so the delivery limit and the logs' retention hold as in a fleet."""
    vhost = f"sandfleet-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    asyncio.run(apply_fleet_policies(Settings(broker_url=url), admin_url=DEFAULT_ADMIN_URL))
    yield url
    _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The test session's key pair: the gateway signs with the first, workers trust the
    second (SANDFLEET_SIGNING_KEY, SANDFLEET_TRUSTED_KEYS)."""
    return generate_keys(tmp_path_factory.mktemp("keys") / "fleet")


@pytest.fixture
def make_settings(
    broker_url: str, tmp_path: Path, signing_keys: tuple[Path, Path]
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "broker_url": broker_url,
            "signing_key": signing_keys[0],
            "trusted_keys": str(signing_keys[1]),
            "host": f"h{uuid.uuid4().hex[:8]}",
            "state_dir": tmp_path / "state",
            "journal_dir": tmp_path / "journal",
            # one per gateway: two gateways never share a view
            "view_path": tmp_path / f"gateway-{uuid.uuid4().hex[:8]}" / "view.sqlite3",
            "heartbeat_seconds": 1.0,
            "stop_grace_seconds": 1.0,
            **overrides,
        }
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with Gateway(settings) as gw:
        yield gw


@pytest.fixture
async def client(settings: Settings, gateway: Gateway) -> AsyncIterator[Client]:
    async with Client(settings=settings) as c:
        yield c


@pytest.fixture
def docker_worker(settings: Settings, test_image: str) -> WorkerFactory:
    """`async with docker_worker(host="a", slots=1) as worker:` — a real Docker worker."""
    return worker_factory(settings, registered_driver("docker"))


@pytest.fixture
def podman_worker(settings: Settings, podman_image: str) -> WorkerFactory:
    """`async with podman_worker(slots=1) as worker:` — a real Podman worker."""
    return worker_factory(settings, registered_driver("podman"))


@pytest.fixture(scope="session")
def vm_guest() -> dict[str, str]:
    """Debian's kernel and a busybox initramfs speaking the guest protocol."""
    subprocess.run([ROOT / "scripts" / "make-vm-guest", str(GUEST_DIR)], check=True, timeout=300)
    return {"kernel": str(GUEST_DIR / "vmlinuz"), "initrd": str(GUEST_DIR / "initrd.img")}


@pytest.fixture
def vm_work_dir() -> Iterator[Path]:
    # Under /var/lib, not pytest's 0700 tmp: the hypervisor runs as its own user.
    path = Path("/var/lib/sandfleet/vm-test") / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    path.parent.chmod(0o755)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vm_worker(settings: Settings, vm_guest: dict[str, str], vm_work_dir: Path) -> WorkerFactory:
    """A real VM worker on qemu:///system with TCG (nested KVM guests hang here)."""

    vm = registered_driver("vm", domain_type="qemu", work_dir=vm_work_dir)
    return worker_factory(settings, vm)


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()
