"""Soak: N jobs through a gateway and 2 workers while a chaos loop SIGKILLs and restarts
workers at random. Prints jobs submitted, terminal, lost, duplicated (more than one
sandbox created for a job id, from the runtime's own event log), GPU double-holds,
leaked GPU claims and worker crashes.

    python -m bench.soak [-n 500] [--kill-every 4] [--seed 1] [--driver docker|podman]
                         [--gpu-share 0.25] [--rate 0] [--cluster [--node-stops 2]]

With --cluster the fleet runs on `./dev cluster` (three RabbitMQ nodes, started if
need be), every process given all three URLs, and a second chaos loop stops a node
--node-stops times while jobs flow (`rabbitmqctl stop_app`), starting it again 10 s
later: first the node that leads the job queue, then node 1 (the one every process
connected to first) unless that was it, else the job queue's new leader. Both modes
print the submission rate and the p50/p95 job latency (accepted to terminal event),
to compare a run on the cluster with one on the single default node. --rate paces
the submissions (jobs/s), so that latency is a job's own rather than its wait behind
the whole burst, and node stops fall while jobs are still being submitted.

A share of the jobs asks for 1 or 2 of a static 3-GPU inventory. The GPUs are the
test CDI devices (tests/fixtures/cdi, installed for the run), and the jobs really get
them on either driver (Docker needs CDI on: Docker >= 25, as `./dev setup` installs;
on a daemon without it the GPU jobs are claimed, then fail `CapabilityMissing` and
release; the checks hold all the same). A double-hold is two jobs whose
[claimed, terminal] event intervals overlap on one GPU: each interval lies inside the
job's real claim, so an overlap means a GPU was handed out twice.

Lost, duplicated, double-held, leaked and crashed must be 0; the exit status says
whether they were. A job counts as lost if it has no terminal event by the deadline
(max(600 s, 6 s per job)). The workers share one host name, so a dead worker's journal
entries are taken over by a restarted worker or by its live peer, as on a real host.
Each process's log is kept under the run's state directory (printed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.broker_tools import throwaway_vhost
from sandfleet.common.amqp import connect
from sandfleet.common.broker_urls import vhost_of
from sandfleet.common.errors import FleetUnreachable
from sandfleet.common.events import Event, Phase
from sandfleet.common.settings import Settings
from sandfleet.common.signing import generate_keys
from sandfleet.common.topology import declare_topology, job_queue_name
from sandfleet.gateway.broker_setup import DEFAULT_ADMIN_URL, apply_fleet_policies
from sandfleet.gateway.client import Client
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support.cluster import NODES, cluster_vhost, queue_leader, start_node, stop_node
from tests.support.gpus import double_holds
from tests.support.runtimes import (
    CDI_DIR,
    CDI_SPEC,
    TEST_CDI_KIND,
    TEST_IMAGE,
    docker_creations,
    sandboxes_created,
)

INVENTORY = {
    "gpus": [
        {"index": i, "uuid": f"GPU-50a50a50-0000-0000-0000-00000000000{i}", "name": "Soak GPU",
         "pci_bus_id": f"0000:{0x3A + i:02x}:00.0"}
        for i in range(3)  # the test CDI spec has devices 0, 1 and 2
    ]
}  # fmt: skip


# With --cluster: how long a stopped node stays down, and the pace of the stops.
NODE_DOWN_SECONDS = 10.0
NODE_STOP_EVERY_SECONDS = 20.0


async def spawn(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """A sandfleet process; its log goes to a file of its own under SOAK_LOG_DIR."""
    log_dir = Path(env["SOAK_LOG_DIR"])
    # A local file opened once per process start: not worth a thread.
    with open(log_dir / f"{args[0]}-{time.monotonic_ns()}.log", "wb") as log:  # noqa: ASYNC230
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandfleet", *args,
            env=env, stdout=log, stderr=log,
        )  # fmt: skip


async def chaos(
    workers: list[asyncio.subprocess.Process],
    worker_args: list[str],
    env: dict[str, str],
    every: float,
    rng: random.Random,
    stop: asyncio.Event,
) -> tuple[int, int]:
    """SIGKILL a random worker every ~`every` s and start a new one in its place; a
    worker found exited by itself is a crash: counted, and replaced too.
    Returns (kills, crashes)."""
    kills = crashes = 0
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.5 * every, 1.5 * every))
        for index, worker in enumerate(workers):
            if worker.returncode is not None:
                crashes += 1
                workers[index] = await spawn(worker_args, env)
        index = rng.randrange(len(workers))
        workers[index].send_signal(signal.SIGKILL)
        await workers[index].wait()
        kills += 1
        workers[index] = await spawn(worker_args, env)
    return kills, crashes


async def node_stops(
    url: str, driver: str, count: int, every: float, stop: asyncio.Event
) -> list[str]:
    """Stop `count` cluster nodes in turn, one every ~`every` s, each started again
    NODE_DOWN_SECONDS later (see the module's docstring for which). The nodes stopped."""
    vhost = vhost_of(url)
    stopped: list[str] = []
    for _ in range(count):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()
        if stop.is_set():
            break
        node = await asyncio.to_thread(queue_leader, vhost, job_queue_name(driver))
        if stopped and NODES[0] not in stopped:
            node = NODES[0]
        print(f"stopping {node} at {time.strftime('%H:%M:%S')}", flush=True)
        await asyncio.to_thread(stop_node, node)
        stopped.append(node)
        await asyncio.sleep(NODE_DOWN_SECONDS)  # chaos pacing, not synchronisation
        await asyncio.to_thread(start_node, node)
        print(f"started {node} at {time.strftime('%H:%M:%S')}", flush=True)
    return stopped


async def submit(client: Client, job: dict[str, Any]) -> None:
    """Submit until the gateway answers: a named job id makes a repeat harmless (the
    gateway answers it as a duplicate), and a lost node can outlast one request."""
    while True:
        try:
            reply = await client.submit(job)
        except FleetUnreachable as exc:
            print(f"submit {job['job_id']}: {exc}; again", flush=True)
            continue
        assert reply.accepted, reply
        return


def request(job_id: str, driver: str, gpu_share: float, rng: random.Random) -> dict[str, Any]:
    command = ["sh", "-c", f"echo {job_id}; sleep {rng.choice([0, 0, 1, 2])}"]
    job: dict[str, Any] = {
        "job_id": job_id,
        "driver": driver,
        "template": {"image": TEST_IMAGE, "command": command},
    }
    if rng.random() < gpu_share:
        job["resource_requirements"] = {"gpu": {"count": rng.choice([1, 1, 2])}}
    return job


@dataclass
class SoakRun:
    driver: str
    job_ids: list[str]
    state_dir: Path
    since: float
    events: list[Event] = field(default_factory=list)
    kills: int = 0
    crashes: int = 0
    nodes_stopped: list[str] = field(default_factory=list)
    # Docker's creations, counted live (dockerd keeps only its last 256 events, too few
    # to ask afterwards about 500 jobs); Podman's are asked afterwards, from its log.
    created: Counter[str] | None = None
    submit_seconds: float = 0.0

    def latencies(self) -> list[float]:
        """Seconds from each job's `accepted` to its (first) terminal event."""
        accepted: dict[str, float] = {}
        ended: dict[str, float] = {}
        for event in self.events:
            if event.job_id is None:
                continue
            if event.phase is Phase.ACCEPTED:
                accepted.setdefault(event.job_id, event.timestamp.timestamp())
            elif event.phase.is_terminal:
                ended.setdefault(event.job_id, event.timestamp.timestamp())
        return [ended[job] - accepted[job] for job in ended if job in accepted]

    def terminal(self) -> dict[str, Phase]:
        wanted = set(self.job_ids)
        phases: dict[str, Phase] = {}
        for event in self.events:
            if event.job_id in wanted and event.phase.is_terminal:
                phases.setdefault(event.job_id, event.phase)
        return phases


async def soak(
    n: int,
    kill_every: float,
    seed: int,
    url: str,
    driver: str,
    gpu_share: float,
    node_stop_count: int = 0,
    rate: float = 0.0,
) -> SoakRun:
    rng = random.Random(seed)
    state = Path(tempfile.mkdtemp(prefix="sandfleet-soak-"))
    inventory = state / "gpus.json"
    inventory.write_text(json.dumps(INVENTORY))
    keys = generate_keys(state / "keys")
    host = f"soak{uuid.uuid4().hex[:4]}"
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": url,
        "SANDFLEET_HOST": host,
        "SANDFLEET_STATE_DIR": str(state / "state"),
        "SANDFLEET_JOURNAL_DIR": str(state / "journal"),
        "SANDFLEET_STOP_GRACE_SECONDS": "1",
        "SANDFLEET_LOG_LEVEL": "WARNING",
        "SANDFLEET_GPU_INVENTORY": str(inventory),
        "SANDFLEET_CDI_KIND": TEST_CDI_KIND,
        "SANDFLEET_GPU_RETRY_SECONDS": "1",
        # A key pair of the run's own: the gateway signs, the workers verify.
        "SANDFLEET_SIGNING_KEY": str(keys[0]),
        "SANDFLEET_TRUSTED_KEYS": str(keys[1]),
        "SOAK_LOG_DIR": str(state / "logs"),
    }
    (state / "logs").mkdir()
    run = SoakRun(driver, [f"soak-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)], state, 0.0)
    run.since = time.time()
    worker_args = ["worker", "--driver", driver, "--slots", "2"]
    settings = Settings(broker_url=url, host=host)
    # As an operator sets up a vhost: clients declare nothing, and the stream below is
    # opened before the gateway has had time to declare the topology itself.
    async with await connect(url, name="soak", settings=settings) as connection:
        await declare_topology(connection, await connection.channel())
    gateway = await spawn(["gateway"], env)
    workers = [await spawn(worker_args, env) for _ in range(2)]
    stop = asyncio.Event()
    try:
        async with Client(settings=settings) as client, client.events() as stream:
            async with asyncio.timeout(60):  # a worker has declared the queues
                async for event in stream:
                    if event.phase is Phase.HEARTBEAT:
                        break
            kills = asyncio.create_task(chaos(workers, worker_args, env, kill_every, rng, stop))
            node_chaos = asyncio.create_task(
                node_stops(url, driver, node_stop_count, NODE_STOP_EVERY_SECONDS, stop)
            )
            started = time.monotonic()
            for number, job_id in enumerate(run.job_ids):
                if rate > 0:  # paced: a steady flow, not one burst queued up
                    await asyncio.sleep(max(0.0, started + number / rate - time.monotonic()))
                await submit(client, request(job_id, driver, gpu_share, rng))
            run.submit_seconds = time.monotonic() - started
            wanted, ended = set(run.job_ids), set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(600, n * 6)):
                    async for event in stream:
                        run.events.append(event)
                        if event.job_id in wanted and event.phase.is_terminal:
                            ended.add(event.job_id)
                            if len(ended) == n:
                                break
            stop.set()
            run.kills, run.crashes = await kills
            run.nodes_stopped = await node_chaos
    finally:
        for process in [gateway, *workers]:
            if process.returncode is None:
                process.terminate()
                await process.wait()
    return run


def report(run: SoakRun) -> int:
    """Print the run's figures; 0 if nothing was lost, duplicated, double-held or leaked,
    and no worker crashed."""
    terminal = run.terminal()
    created = run.created if run.created is not None else sandboxes_created(run.driver, run.since)
    lost = len(run.job_ids) - len(terminal)
    duplicated = sum(1 for job_id in run.job_ids if created[job_id] > 1)
    overlaps = double_holds(run.events)
    leaked = len(GpuClaimStore(run.state_dir / "state").claims())
    phases = Counter(p.value for p in terminal.values())
    gpu_jobs = len({e.job_id for e in run.events if e.phase is Phase.CLAIMED})
    print(f"driver:                {run.driver}  (process logs in {run.state_dir / 'logs'})")
    print(f"jobs submitted:        {len(run.job_ids)}  ({gpu_jobs} claimed GPUs)")
    print(f"worker kills (SIGKILL): {run.kills}")
    print(f"broker nodes stopped:  {len(run.nodes_stopped)}  {run.nodes_stopped}")
    rate = len(run.job_ids) / run.submit_seconds if run.submit_seconds else 0.0
    print(f"submission rate:       {rate:.1f} jobs/s  ({run.submit_seconds:.1f} s for all)")
    latencies = run.latencies()
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=20)
        print(f"job latency:           p50 {cuts[9]:.2f} s, p95 {cuts[18]:.2f} s")
    print(f"worker crashes:        {run.crashes}  (exited by themselves; logs say why)")
    print(f"jobs terminal:         {len(terminal)}  {dict(phases)}")
    print(f"lost:                  {lost}")
    print(f"duplicated:            {duplicated}  (jobs with more than one sandbox created)")
    print(f"GPU double-holds:      {len(overlaps)}  {overlaps[:5]}")
    for job_id in sorted({job for overlap in overlaps for job in overlap.split()[1::2]}):
        print(f"  timeline of {job_id}:")
        for e in run.events:
            if e.job_id == job_id:
                print(
                    f"    {e.timestamp:%H:%M:%S.%f} {e.phase.value:9} {e.reason:18} "
                    f"{e.worker_id} {','.join(e.gpus)}"
                )
    print(f"leaked GPU claims:     {leaked}")
    failures = lost + duplicated + len(overlaps) + leaked + run.crashes
    return 0 if failures == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--driver", choices=["docker", "podman"], default="docker")
    parser.add_argument(
        "--gpu-share", type=float, default=0.25, help="share of jobs asking for GPUs"
    )
    parser.add_argument("--cluster", action="store_true", help="run on ./dev cluster")
    parser.add_argument("--node-stops", type=int, default=2, help="with --cluster")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="submissions per second (0: all at once)"
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fleet_vhost(cluster=args.cluster))
        stack.enter_context(test_cdi_spec())
        node_stop_count = args.node_stops if args.cluster else 0
        knobs = (args.n, args.kill_every, args.seed, url, args.driver, args.gpu_share)
        created = stack.enter_context(docker_creations()) if args.driver == "docker" else None
        run = asyncio.run(soak(*knobs, node_stop_count, args.rate))
        run.created = created
    raise SystemExit(report(run))  # once the creations' follower has read to its end


@contextlib.contextmanager
def fleet_vhost(*, cluster: bool) -> Iterator[str]:
    """A throwaway vhost with the fleet's queue policies: on the cluster (a URL list) or
    on the default node."""
    if cluster:
        with cluster_vhost() as urls:
            yield urls
        return
    url, cleanup = throwaway_vhost(Settings().broker_url)
    try:
        asyncio.run(apply_fleet_policies(Settings(broker_url=url), admin_url=DEFAULT_ADMIN_URL))
        yield url
    finally:
        cleanup()


@contextlib.contextmanager
def test_cdi_spec() -> Iterator[None]:
    """The test CDI spec where Podman and Docker look for specs, for the run (if not there)."""
    CDI_DIR.mkdir(parents=True, exist_ok=True)
    cdi_spec = CDI_DIR / CDI_SPEC.name
    installed = not cdi_spec.exists()
    if installed:
        shutil.copyfile(CDI_SPEC, cdi_spec)
    try:
        yield
    finally:
        if installed:
            cdi_spec.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
