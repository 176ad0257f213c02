"""Soak: N jobs through a gateway and 2 workers while a chaos loop SIGKILLs and restarts
workers at random. Prints jobs submitted, terminal, lost, duplicated (more than one
sandbox created for a job id, from dockerd's own event log) and leaked GPU claims.

    python -m bench.soak [-n 500] [--kill-every 4] [--seed 1]

Lost, duplicated and leaked must be 0; the exit status says whether they were. A job
counts as lost if it has no terminal event by the deadline (max(600 s, 6 s per job)).
The workers share one host name, so a restarted worker takes over its dead peer's
journal entries, as on a real host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.gateway_throughput import throwaway_vhost
from common.events import Phase
from common.settings import Settings
from gateway.client import Client
from workers.gpu.claims import GpuClaimStore

IMAGE = "sandfleet-test/busybox:latest"


async def spawn(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandfleet_cli", *args,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def chaos(
    workers: list[asyncio.subprocess.Process],
    env: dict[str, str],
    every: float,
    rng: random.Random,
    stop: asyncio.Event,
) -> int:
    kills = 0
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.5 * every, 1.5 * every))
        index = rng.randrange(len(workers))
        workers[index].send_signal(signal.SIGKILL)
        await workers[index].wait()
        kills += 1
        workers[index] = await spawn(["worker", "--driver", "docker", "--slots", "2"], env)
    return kills


def sandboxes_created(since: float) -> Counter[str]:
    out = subprocess.run(
        ["docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
         "--filter", "type=container", "--filter", "event=create",
         "--format", '{{index .Actor.Attributes "sandfleet.job_id"}}'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Counter(line for line in out.stdout.split() if line)


async def soak(n: int, kill_every: float, seed: int, url: str) -> int:
    rng = random.Random(seed)
    state = Path(tempfile.mkdtemp(prefix="sandfleet-soak-"))
    host = f"soak{uuid.uuid4().hex[:4]}"
    env = {
        **os.environ,
        "SANDFLEET_BROKER_URL": url,
        "SANDFLEET_HOST": host,
        "SANDFLEET_STATE_DIR": str(state / "state"),
        "SANDFLEET_JOURNAL_DIR": str(state / "journal"),
        "SANDFLEET_STOP_GRACE_SECONDS": "1",
        "SANDFLEET_LOG_LEVEL": "WARNING",
    }
    settings = Settings(broker_url=url, host=host)
    since = time.time()
    gateway = await spawn(["gateway"], env)
    workers = [await spawn(["worker", "--driver", "docker", "--slots", "2"], env) for _ in range(2)]
    stop = asyncio.Event()
    job_ids = [f"soak-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    terminal: dict[str, Phase] = {}
    try:
        async with Client(settings=settings) as client, client.events() as stream:
            async with asyncio.timeout(60):  # a worker has declared the queues
                async for event in stream:
                    if event.phase is Phase.HEARTBEAT:
                        break
            chaos_task = asyncio.create_task(chaos(workers, env, kill_every, rng, stop))
            for job_id in job_ids:
                command = ["sh", "-c", f"echo {job_id}; sleep {rng.choice([0, 0, 1, 2])}"]
                await client.submit(
                    {"job_id": job_id, "template": {"image": IMAGE, "command": command}}
                )
            wanted = set(job_ids)
            try:
                async with asyncio.timeout(max(600, n * 6)):
                    async for event in stream:
                        if event.job_id in wanted and event.phase.is_terminal:
                            terminal.setdefault(event.job_id, event.phase)
                            if len(terminal) == n:
                                break
            except TimeoutError:
                pass
            stop.set()
            kills = await chaos_task
    finally:
        for process in [gateway, *workers]:
            if process.returncode is None:
                process.terminate()
                await process.wait()
    created = sandboxes_created(since)
    lost = n - len(terminal)
    duplicated = sum(1 for job_id in job_ids if created[job_id] > 1)
    leaked = len(GpuClaimStore(state / "state").claims())
    phases = Counter(p.value for p in terminal.values())
    print(f"jobs submitted:        {n}")
    print(f"worker kills (SIGKILL): {kills}")
    print(f"jobs terminal:         {len(terminal)}  {dict(phases)}")
    print(f"lost:                  {lost}")
    print(f"duplicated:            {duplicated}  (jobs with more than one sandbox created)")
    print(f"leaked GPU claims:     {leaked}")
    return 0 if lost == duplicated == leaked == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    url, cleanup = throwaway_vhost(Settings().broker_url)
    try:
        raise SystemExit(asyncio.run(soak(args.n, args.kill_every, args.seed, url)))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
