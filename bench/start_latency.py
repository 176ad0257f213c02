"""How fast a sandbox starts: cold, warm (from a pool), and the runtime's own `run --rm`.

    python -m bench.start_latency [--driver docker|podman|vm] [-n 30] [--burst 20 --pool 4]

In one run, on one machine, against a real gateway and worker in this process (on the
broker of SANDFLEET_BROKER_URL, in a throwaway vhost when rabbitmqctl can make one):

  runtime   the runtime's own `docker run --rm IMAGE true` / `podman run --rm IMAGE
            true`, timed as a process (for vm: none; the cold rows are the baseline)
  cold      N jobs running `true`, one after another, on a worker without pools:
            submit → running, and submit → succeeded
  warm      the same on a worker keeping a pool of the job's profile (each job sent
            once the pool is full again, so each one finds a ready sandbox)
  burst     `--burst` jobs at once on a worker of `--pool` slots, without a pool and
            with a pool of `--pool`: submit → succeeded

Times are from just before `submit` to the event's own timestamp (the worker's clock:
the same machine's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.broker_tools import throwaway_vhost
from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.gateway.client import Client
from sandfleet.gateway.service import Gateway
from sandfleet.workers import registry
from sandfleet.workers.drivers.base import DriverHost
from sandfleet.workers.runtime import Worker
from sandfleet.workers.warm_profiles import PoolProfile

ROOT = Path(__file__).resolve().parent.parent
GUEST = Path("/var/lib/sandfleet/guest")
IMAGES = {"docker": "sandfleet-test/busybox:latest", "podman": "sandfleet-test/busybox:latest"}


@dataclass(frozen=True)
class Target:
    driver: str
    image: str
    block: dict[str, Any]

    def request(self) -> dict[str, Any]:
        template: dict[str, Any] = {"image": self.image, "command": ["true"]}
        if self.block:
            template["driver_config"] = {self.driver: self.block}
        return {"job_id": f"bench-{uuid.uuid4().hex[:10]}", "driver": self.driver,
                "template": template}  # fmt: skip

    def profile(self, count: int) -> PoolProfile:
        return PoolProfile(image=self.image, count=count, driver_config=self.block)


def target(driver: str, image: str | None) -> Target:
    if driver == "vm":
        os.environ.setdefault("SANDFLEET_VM_DOMAIN_TYPE", "qemu")  # TCG: see DESIGN.md
        return Target("vm", image or str(GUEST / "vmlinuz"), {"initrd": str(GUEST / "initrd.img")})
    return Target(driver, image or IMAGES[driver], {})


@asynccontextmanager
async def fleet(
    url: str, goal: Target, *, slots: int, pool: int = 0
) -> AsyncIterator[tuple[Client, Worker]]:
    keys = Path(tempfile.mkdtemp(prefix="sandfleet-bench-"))
    signing_key, public_key = generate_keys(keys / "keys")
    settings = Settings(
        broker_url=url,
        host=f"bench{uuid.uuid4().hex[:6]}",
        signing_key=signing_key,
        trusted_keys=str(public_key),
        state_dir=keys / "state",
        journal_dir=keys / "journal",
    )
    plugin = registry.load(goal.driver)
    driver = plugin.make(plugin.settings(), DriverHost(cdi_kind=settings.cdi_kind))
    warm = [goal.profile(pool)] if pool else []
    try:
        worker = Worker(settings, driver, slots=slots, warm=warm)
        async with Gateway(settings), worker, Client(url) as client:
            await asyncio.wait_for(worker.warm.full.wait(), 300)
            yield client, worker
    finally:
        await driver.aclose()


async def one_job(client: Client, goal: Target) -> tuple[float, float]:
    """(submit → running, submit → succeeded) of one `true` job, in seconds."""
    job = goal.request()
    wanted = {Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED, Phase.TIMED_OUT}
    async with client.events(job_id=job["job_id"], phases=wanted) as stream:
        submitted = time.time()
        assert (await client.submit(job)).accepted
        running = None
        async for event in stream:
            if event.phase is Phase.RUNNING:
                running = event.timestamp.timestamp() - submitted
            elif event.phase is Phase.SUCCEEDED and running is not None:
                return running, event.timestamp.timestamp() - submitted
            else:
                raise RuntimeError(f"job {job['job_id']}: {event.phase} {event.message}")
    raise AssertionError("a live stream does not end")


async def sequential(url: str, goal: Target, n: int, *, pool: int) -> list[tuple[float, float]]:
    async with fleet(url, goal, slots=1, pool=pool) as (client, worker):
        await one_job(client, goal)  # the first job of a fleet pays its set-up
        times = []
        for _ in range(n):
            await asyncio.wait_for(worker.warm.full.wait(), 300)
            times.append(await one_job(client, goal))
    return times


async def burst(url: str, goal: Target, jobs: int, *, slots: int, pool: int) -> list[float]:
    async with fleet(url, goal, slots=slots, pool=pool) as (client, _):
        await one_job(client, goal)
        done = await asyncio.gather(*(one_job(client, goal) for _ in range(jobs)))
    return [succeeded for _, succeeded in done]


def runtime_run(goal: Target, n: int) -> list[float] | None:
    """The runtime's own `run --rm IMAGE true`, timed as a process; None for VMs."""
    if goal.driver == "vm":
        return None
    command = [goal.driver, "run", "--rm", goal.image, "true"]
    # Podman's CLI reads the same limits file as the service (root's rlimits are low here).
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}
    subprocess.run(command, check=True, capture_output=True, env=env)  # the image's first run
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    return times


def p(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def row(name: str, values: list[float], base: float) -> str:
    p50, p95 = p(values, 50), p(values, 95)
    return f"{name:42} {p50:8.3f} {p95:8.3f} {p50 / base:9.2f}x"


async def measure(url: str, goal: Target, n: int, jobs: int, pool: int) -> None:
    own = await asyncio.to_thread(runtime_run, goal, n)
    cold = await sequential(url, goal, n, pool=0)
    warm = await sequential(url, goal, n, pool=2)
    cold_burst = await burst(url, goal, jobs, slots=pool, pool=0)
    warm_burst = await burst(url, goal, jobs, slots=pool, pool=pool)
    base_name = f"{goal.driver} run --rm (own)" if own else "cold submit → succeeded"
    base = p(own, 50) if own else p([s for _, s in cold], 50)
    print(f"{goal.driver}: `true` in {goal.image}; {n} sequential jobs; a burst of {jobs} "
          f"on {pool} slots; ratio: p50 against {base_name}")  # fmt: skip
    print(f"{'':42} {'p50 s':>8} {'p95 s':>8} {'ratio':>10}")
    if own:
        print(row(base_name, own, base))
    for name, times in (("cold", cold), ("warm", warm)):
        print(row(f"{name} submit → running", [r for r, _ in times], base))
        print(row(f"{name} submit → succeeded", [s for _, s in times], base))
    print(row("burst cold submit → succeeded", cold_burst, base))
    print(row(f"burst warm (pool {pool}) submit → succeeded", warm_burst, base))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", choices=["docker", "podman", "vm"], default="docker")
    parser.add_argument("--image", help="default: the test image (vm: the test guest's kernel)")
    parser.add_argument("-n", type=int, default=30, help="sequential jobs per row")
    parser.add_argument("--burst", type=int, default=20, help="jobs submitted at once")
    parser.add_argument("--pool", type=int, default=4, help="slots, and pool size, in the burst")
    args = parser.parse_args()
    url, cleanup = throwaway_vhost(Settings().broker_url)
    try:
        asyncio.run(measure(url, target(args.driver, args.image), args.n, args.burst, args.pool))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
