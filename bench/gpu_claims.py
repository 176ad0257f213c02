"""GPU claim store throughput: claim+release cycles per second.

    python -m bench.gpu_claims [--seconds 3] [--state-dir DIR]

Runs one process alone, then 4 processes contending for the same 4 GPUs, and, as a
baseline in the same run, bare flock/unlock cycles on the same filesystem (the floor
any correct cross-process store pays). Each claim+release is two locked
read-modify-write transactions of the claims file.

Then, on the 8-GPU DGX-like fixture (two 4-GPU NVLink islands, two NUMA nodes), 4
processes contending for 1- and 2-GPU claims through the plain allocator (the first
free GPUs, `claim_any`) and through the topology-aware one (`GpuAllocator`, placement
under the lock), in the same run; the topology-aware one must stay within 2x.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import GpuClaimStore, NotEnoughGpus
from sandfleet.workers.gpu.inventory import from_static_file
from sandfleet.workers.gpu.placement import Topology, place

GPUS = [f"GPU-{i}" for i in range(4)]
DGX_INVENTORY = Path(__file__).resolve().parents[1] / "tests/fixtures/gpu-dgx-8/inventory.json"


Results = multiprocessing.Queue  # of (cycles done, claims refused) per process


def cycle(claim: Callable[[str], object], release: Callable[[str], object], worker: str,
          seconds: float, results: Results[tuple[int, int]]) -> None:  # fmt: skip
    done = refused = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = f"{worker}-{done}-{refused}"
        try:
            claim(job)
        except NotEnoughGpus:
            refused += 1
            continue
        release(job)
        done += 1
    results.put((done, refused))


def cycle_claims(
    state_dir: str, worker: str, seconds: float, results: Results[tuple[int, int]]
) -> None:
    store = GpuClaimStore(Path(state_dir))

    def claim(job: str) -> object:
        return store.claim_any(
            job_id=job, count=1, candidates=GPUS, device_for=str, driver="docker", worker_id=worker
        )

    cycle(claim, lambda job: store.release(job, driver="docker"), worker, seconds, results)


def cycle_plain_dgx(
    state_dir: str, count: int, worker: str, seconds: float, results: Results[tuple[int, int]]
) -> None:
    """The plain allocator on the 8-GPU fixture: the first `count` free GPUs."""
    store = GpuClaimStore(Path(state_dir))
    uuids = [gpu.uuid for gpu in from_static_file(DGX_INVENTORY)]

    def claim(job: str) -> object:
        return store.claim_any(
            job_id=job, count=count, candidates=uuids, device_for=str,
            driver="docker", worker_id=worker,
        )  # fmt: skip

    cycle(claim, lambda job: store.release(job, driver="docker"), worker, seconds, results)


def cycle_topology_dgx(
    state_dir: str, count: int, worker: str, seconds: float, results: Results[tuple[int, int]]
) -> None:
    """The topology-aware allocator a worker uses, on the 8-GPU fixture."""
    store = GpuClaimStore(Path(state_dir))
    gpus = GpuAllocator(
        from_static_file(DGX_INVENTORY), store, driver="docker", worker_id=worker,
        device_id=lambda gpu: str(gpu.index),
    )  # fmt: skip
    request = gpus.request([], count, path="bench", host="bench")

    def claim(job: str) -> object:
        return gpus.claim_placed_now(job, request)

    cycle(claim, lambda job: store.release(job, driver="docker"), worker, seconds, results)


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


def compare_on_dgx(base: Path, seconds: float) -> None:
    """Plain against topology-aware, 4 processes on the 8-GPU fixture, same run."""
    for count in (1, 2):
        rates = {}
        for name, target in (("plain", cycle_plain_dgx), ("topology", cycle_topology_dgx)):
            state = base / f"dgx-{name}-{count}"
            rates[name], refused = run(target, (str(state), count), 4, seconds)
            print(
                f"8-GPU fixture, 4 processes, {count}-GPU claims, {name:>8} allocator: "
                f"{rates[name]:8.0f} claim+release/s (refused: {refused})"
            )
        ratio = rates["plain"] / rates["topology"] if rates["topology"] else float("inf")
        verdict = "within 2x" if ratio <= 2 else "OVER 2x"
        print(f"  plain / topology-aware = {ratio:.2f} ({verdict})")


def placement_cost() -> None:
    """The placement decision alone, as made under the lock (no file, no lock)."""
    topology = Topology.of(from_static_file(DGX_INVENTORY))
    free = set(topology.whole) - {topology.whole[0], topology.whole[5]}
    for count in (1, 2, 4):
        calls = 20000
        started = time.perf_counter()
        for _ in range(calls):
            place(topology, free, count)
        each = (time.perf_counter() - started) / calls * 1e6
        print(f"placement alone, 8-GPU fixture, 6 free, {count} wanted: {each:6.1f} us per call")


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
    compare_on_dgx(base, args.seconds)
    placement_cost()


if __name__ == "__main__":
    main()
