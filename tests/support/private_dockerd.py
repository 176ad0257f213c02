"""A dockerd of the test's own, beside the system one, for engines the host's daemon is
not: one without CDI, one with only the NVIDIA runtime. It has its own socket,
--data-root, --exec-root, pidfile and daemon.json, its own managed containerd (under
its --exec-root, in its own namespace), and its own network namespace with no bridge
and no iptables rules in it. The system dockerd and the host's network are never
touched.

`fake_nvidia_hook` makes a stand-in for the NVIDIA Container Toolkit's
`nvidia-container-runtime-hook`: dockerd registers its `nvidia` device driver only when
that binary is on its PATH, and runs it as each GPU container's prestart hook. The
stand-in writes the OCI spec's environment it was run for to `<records>/<id>.json`,
which is what the real hook reads NVIDIA_VISIBLE_DEVICES from.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_SECONDS = 60.0
HOOK_NAME = "nvidia-container-runtime-hook"

_HOOK_SCRIPT = """\
import json, pathlib, sys
state = json.load(sys.stdin)  # the OCI state runc gives a hook: id, pid, bundle
spec = json.loads((pathlib.Path(state["bundle"]) / "config.json").read_text())
record = {"args": sys.argv[1:], "env": spec["process"]["env"]}
(pathlib.Path(RECORDS) / (state["id"] + ".json")).write_text(json.dumps(record))
"""


class PrivateDockerdUnavailable(RuntimeError):
    """The private daemon could not be started here (the reason is the message)."""


@dataclass(frozen=True)
class PrivateDockerd:
    url: str  # unix:///…/docker.sock
    root: Path


def fake_nvidia_hook(bin_dir: Path, records: Path) -> Path:
    """`bin_dir/nvidia-container-runtime-hook`: records what it was run for (see above)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    hook = bin_dir / HOOK_NAME
    hook.write_text(f"#!{sys.executable}\nRECORDS = {str(records)!r}\n{_HOOK_SCRIPT}")
    hook.chmod(0o755)
    return hook


def hook_records(records: Path) -> dict[str, dict[str, Any]]:
    """What the fake hook recorded, by container id."""
    return {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}


@contextlib.contextmanager
def private_dockerd(
    config: Mapping[str, Any], *, images: tuple[str, ...] = (), path_first: Path | None = None
) -> Iterator[PrivateDockerd]:
    """A private dockerd with `config` as its daemon.json, `images` loaded from the
    system daemon, `path_first` ahead on its PATH; stopped and removed on the way out.
    Raises PrivateDockerdUnavailable when it cannot start."""
    for binary in ("dockerd", "unshare"):
        if shutil.which(binary) is None:
            raise PrivateDockerdUnavailable(f"no {binary} binary on PATH")
    # Short: the socket and containerd's paths under it must fit a sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="sfd-", dir="/tmp"))
    daemon = PrivateDockerd(url=f"unix://{root}/docker.sock", root=root)
    (root / "daemon.json").write_text(json.dumps(config))
    env = dict(os.environ)
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    with open(root / "dockerd.log", "wb") as log:
        process = subprocess.Popen(_dockerd_args(root), env=env, stdout=log, stderr=log)
    try:
        _wait_until_up(daemon, process)
        for image in images:
            _load_image(daemon, image)
        yield daemon
    finally:
        _stop(process, root)
        shutil.rmtree(root, ignore_errors=True)


def _dockerd_args(root: Path) -> list[str]:
    # In a network namespace of its own: a dockerd with --bridge=none deletes the host's
    # `docker0` at start (the system dockerd's bridge, which its containers then cannot
    # join), and any bridge, route or iptables rule of this one stays its own.
    return [
        "unshare",
        "--net",
        "dockerd",
        f"--config-file={root / 'daemon.json'}",
        f"--host=unix://{root / 'docker.sock'}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'dockerd.pid'}",
        "--containerd-namespace=sandfleet-private",
        "--containerd-plugins-namespace=sandfleet-private-plugins",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
    ]


def _wait_until_up(daemon: PrivateDockerd, process: subprocess.Popen[bytes]) -> None:
    """Polls the socket (the daemon offers nothing else to wait on) until it answers."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        answer = subprocess.run(
            ["docker", "-H", daemon.url, "version", "--format", "{{.Server.Version}}"],
            check=False,
            capture_output=True,
            timeout=30,
        )
        if answer.returncode == 0:
            return
        time.sleep(0.2)
    log = (daemon.root / "dockerd.log").read_text(errors="replace")[-2000:]
    raise PrivateDockerdUnavailable(f"private dockerd did not come up: {log}")


def _load_image(daemon: PrivateDockerd, image: str) -> None:
    saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    loaded = subprocess.run(
        ["docker", "-H", daemon.url, "load", "--quiet"],
        stdin=saved.stdout,
        check=False,
        capture_output=True,
        timeout=120,
    )
    if saved.wait(timeout=120) != 0 or loaded.returncode != 0:
        raise PrivateDockerdUnavailable(f"could not load {image}: {loaded.stderr.decode()}")


def _stop(process: subprocess.Popen[bytes], root: Path) -> None:
    """SIGTERM (dockerd stops its containers and its containerd), SIGKILL after 30 s,
    and then its containerd, which a killed dockerd leaves behind."""
    process.terminate()
    try:
        process.wait(timeout=30)
        return
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
    with contextlib.suppress(OSError, ValueError):
        pid = int((root / "exec" / "containerd" / "containerd.pid").read_text().strip())
        # Only if that pid is still our daemon's containerd (its config is under root).
        if str(root) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)
