"""Gateway processes for the throughput bench: `sandfleet gateway` as a fleet runs it,
each with its own job view, all signing with one key made per run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandfleet.common.signing import generate_keys

STOP_TIMEOUT_SECONDS = 600.0  # a gateway flushes its job view as it stops


class GatewayKit:
    """What every gateway of one run shares (the signing key) and a folder for their views."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="sandfleet-bench-"))
        # The gateway signs every job, as in a real fleet (Ed25519: tens of microseconds).
        self.signing_key, _ = generate_keys(self.folder / "keys")

    def view_path(self) -> Path:
        """A job view file of its own (a gateway's view mirrors one vhost's log)."""
        return self.folder / f"view-{uuid.uuid4().hex[:8]}.sqlite3"

    def env(self, url: str, view_path: Path, name: str) -> dict[str, str]:
        return {
            **os.environ,
            "SANDFLEET_BROKER_URL": url,
            "SANDFLEET_HOST": name,
            "SANDFLEET_LOG_LEVEL": "WARNING",
            "SANDFLEET_SIGNING_KEY": str(self.signing_key),
            "SANDFLEET_VIEW_PATH": str(view_path),
        }


def start_gateway(kit: GatewayKit, url: str, view_path: Path, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sandfleet", "gateway"], env=kit.env(url, view_path, name)
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and wait for it to finish (its view flushed); SIGKILL past the timeout."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def gateways(kit: GatewayKit, url: str, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` gateway processes on `url`, stopped on the way out (interrupted or not)."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            started.append(start_gateway(kit, url, kit.view_path(), f"benchgw{i}"))
        yield started
    finally:
        for process in started:
            stop(process)


def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def check_alive(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is not None:
            raise RuntimeError(f"gateway process {process.pid} exited ({process.returncode})")
