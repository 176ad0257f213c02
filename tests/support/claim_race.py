"""Processes hammering one claim store, and an independent checker of what they held.

Each process records, for every claim it got, the interval during which it believed
it held each GPU: from just after `claim` returned to just before `release` was
called, on CLOCK_MONOTONIC (one clock for all processes of the host). A correct store
never lets two such intervals of one GPU overlap.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sandfleet.workers.gpu.allocator import GpuAllocator
from sandfleet.workers.gpu.claims import Claim, GpuBusy, GpuClaimStore, NotEnoughGpus
from sandfleet.workers.gpu.inventory import GpuInventory, from_static_file

Interval = tuple[str, str, int, int]  # gpu, job, start_ns, end_ns


def hammer(
    state_dir: str, worker: str, operations: int, out: str, gpus: list[str], seed: int
) -> None:
    """Run `operations` claim-or-release operations; write held intervals and counts to `out`."""
    rng = random.Random(seed)
    store = GpuClaimStore(Path(state_dir))
    held: dict[str, tuple[Claim, int]] = {}
    intervals: list[Interval] = []
    conflicts = 0
    for n in range(operations):
        if held and (rng.random() < 0.5 or len(held) >= 2):
            job, (claim, start) = held.popitem()
            end = time.monotonic_ns()
            store.release(job, driver=claim.driver)
            intervals.extend((gpu, job, start, end) for gpu in claim.gpus)
            continue
        job = f"{worker}-{n}"
        try:
            if rng.random() < 0.5:
                wanted = rng.sample(gpus, rng.choice((1, 2)))
                claim = store.claim(
                    job_id=job, gpus=wanted, devices=wanted, driver="docker", worker_id=worker
                )
            else:
                claim = store.claim_any(
                    job_id=job, count=rng.choice((1, 2)), candidates=gpus, device_for=str,
                    driver="vm", worker_id=worker,
                )  # fmt: skip
        except (GpuBusy, NotEnoughGpus):
            conflicts += 1
            continue
        held[job] = (claim, time.monotonic_ns())
    for job, (claim, start) in held.items():
        end = time.monotonic_ns()
        store.release(job, driver=claim.driver)
        intervals.extend((gpu, job, start, end) for gpu in claim.gpus)
    Path(out).write_text(json.dumps({"intervals": intervals, "conflicts": conflicts}))


def overlaps(intervals: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Pairs of intervals in which two jobs held the same GPU at once."""
    by_gpu: dict[str, list[Interval]] = defaultdict(list)
    for interval in intervals:
        by_gpu[interval[0]].append(interval)
    found = []
    for spans in by_gpu.values():
        spans.sort(key=lambda s: s[2])
        latest = spans[0]
        for span in spans[1:]:
            if span[2] < latest[3]:
                found.append((latest, span))
            if span[3] > latest[3]:
                latest = span
    return found


def hammer_mig(
    state_dir: str, worker: str, operations: int, out: str, inventory: str, seed: int
) -> None:
    """As `hammer`, through a worker's allocator on an inventory with MIG instances: exact
    whole GPUs and instances, count-only whole GPUs, and instances by profile. Each
    interval names a conflict unit (`mig_units`), so the plain checker judges MIG."""
    rng = random.Random(seed)
    gpus = GpuAllocator(
        from_static_file(Path(inventory)),
        GpuClaimStore(Path(state_dir)),
        driver="docker",
        worker_id=worker,
        device_id=lambda g: str(g.index),
        mig_device_id=lambda m: m.cdi_name,
    )
    units = mig_units(gpus.inventory)
    ids = [*units]
    profiles = sorted(gpus.topology.mig)
    held: dict[str, tuple[Claim, int]] = {}
    intervals: list[Interval] = []
    conflicts = 0

    def release(job: str, claim: Claim, start: int) -> None:
        end = time.monotonic_ns()
        asyncio.run(gpus.release(job))
        intervals.extend((unit, job, start, end) for i in claim.gpus for unit in units[i])

    for n in range(operations):
        if held and (rng.random() < 0.5 or len(held) >= 2):
            job, (claim, start) = held.popitem()
            release(job, claim, start)
            continue
        job, kind = f"{worker}-{n}", rng.random()
        if kind < 0.4:
            request = gpus.request([rng.choice(ids)], 1, path="ids", host="h")
        elif kind < 0.6:
            request = gpus.request([], 1, path="count", host="h")
        else:
            request = gpus.request([], 1, path="count", host="h", mig_profile=rng.choice(profiles))
        try:
            claim = asyncio.run(gpus.claim(job, request))
        except (GpuBusy, NotEnoughGpus):
            conflicts += 1
            continue
        held[job] = (claim, time.monotonic_ns())
    for job, (claim, start) in held.items():
        release(job, claim, start)
    Path(out).write_text(json.dumps({"intervals": intervals, "conflicts": conflicts}))


def mig_units(inventory: GpuInventory) -> dict[str, set[str]]:
    """The conflict units each claimable id holds: a MIG instance itself; a whole GPU
    itself and every instance of it (so a whole GPU and any of its instances overlap)."""
    units = {gpu.uuid: {gpu.uuid, *(m.uuid for m in gpu.mig)} for gpu in inventory}
    return units | {m.uuid: {m.uuid} for m in inventory.mig_devices()}


def claim_through_a_drain(state_dir: str, worker: str, out: str, done: Any, stop: Any) -> None:
    """Claim any one of GPU-0..3 and release it, over and over until `stop` is set;
    write each claim's (start_ns, GPUs) to `out`, the start taken before `claim_any`
    was called. `done` (a shared int) counts the claims tried."""
    store = GpuClaimStore(Path(state_dir))
    gpus = [f"GPU-{i}" for i in range(4)]
    claims: list[tuple[int, list[str]]] = []
    n = 0
    while not stop.is_set():
        n += 1
        job, start = f"{worker}-{n}", time.monotonic_ns()
        try:
            claim = store.claim_any(
                job_id=job, count=1, candidates=gpus, device_for=str, driver="d", worker_id=worker
            )
        except NotEnoughGpus:
            continue
        finally:
            with done.get_lock():
                done.value += 1
        claims.append((start, list(claim.gpus)))
        store.release(job, driver="d")
    Path(out).write_text(json.dumps(claims))
