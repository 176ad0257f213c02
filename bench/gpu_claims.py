"""GPU claim store throughput: claim+release cycles per second.

    python -m bench.gpu_claims [--seconds 3] [--state-dir DIR]

Runs one process alone, then 4 processes contending for the same 4 GPUs, and, as a
baseline in the same run, bare flock/unlock cycles on the same filesystem (the floor
any correct cross-process store pays). Each claim+release is two locked
read-modify-write transactions of the claims file.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from sandfleet.workers.gpu.claims import GpuClaimStore, NotEnoughGpus

GPUS = [f"GPU-{i}" for i in range(4)]


Results = multiprocessing.Queue  # of (cycles done, claims refused) per process


def cycle_claims(
    state_dir: str, worker: str, seconds: float, results: Results[tuple[int, int]]
) -> None:
    store = GpuClaimStore(Path(state_dir))
    done = refused = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = f"{worker}-{done}-{refused}"
        try:
            store.claim_any(
                job_id=job,
                count=1,
                candidates=GPUS,
                device_for=str,
                driver="docker",
                worker_id=worker,
            )
        except NotEnoughGpus:
            refused += 1
            continue
        store.release(job, driver="docker")
        done += 1
    results.put((done, refused))


def cycle_flock(path: str, worker: str, seconds: float, results: Results[tuple[int, int]]) -> None:
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
        done += 1
    results.put((done, 0))


def run(
    target: object, args: tuple[object, ...], processes: int, seconds: float
) -> tuple[float, int]:
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[tuple[int, int]] = context.Queue()
    workers = [
        context.Process(target=target, args=(*args, f"w{i}", seconds, results))  # type: ignore[arg-type]
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    totals = [results.get(timeout=seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(done for done, _ in totals) / seconds, sum(refused for _, refused in totals)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--state-dir", type=Path, default=None, help="default: a fresh temp dir")
    args = parser.parse_args()
    base = args.state_dir or Path(tempfile.mkdtemp(prefix="sandfleet-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"state dir: {base} ({os.cpu_count()} CPUs), {args.seconds:.0f} s per run")
    for processes in (1, 4):
        lock_rate, _ = run(
            cycle_flock, (str(base / f"bare-{processes}.lock"),), processes, args.seconds
        )
        state = base / f"claims-{processes}"
        rate, refused = run(cycle_claims, (str(state),), processes, args.seconds)
        print(
            f"{processes} process(es): {rate:8.0f} claim+release/s "
            f"(refused while all 4 GPUs were held: {refused});  "
            f"baseline bare flock cycles: {lock_rate:8.0f}/s"
        )


if __name__ == "__main__":
    main()
