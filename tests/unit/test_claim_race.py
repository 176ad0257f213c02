"""Many processes, one claim store: no GPU is ever held by two jobs at once."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from sandfleet.workers.gpu.inventory import from_static_file
from tests.support.claim_race import Interval, hammer, hammer_mig, overlaps
from tests.support.gpus import MIG_DIR

GPUS = [f"GPU-{i}" for i in range(4)]


def test_checker_finds_overlaps() -> None:
    assert overlaps([("g", "a", 0, 10), ("g", "b", 20, 30)]) == []
    assert overlaps([("g", "a", 0, 10), ("h", "b", 5, 30)]) == []
    assert overlaps([("g", "a", 0, 10), ("g", "b", 5, 30)]) == [
        (("g", "a", 0, 10), ("g", "b", 5, 30))
    ]
    # an interval hidden inside a long one is still caught
    assert len(overlaps([("g", "a", 0, 100), ("g", "b", 10, 20), ("g", "c", 30, 40)])) == 2


def test_four_processes_ten_thousand_operations_zero_overlaps(tmp_path: Path) -> None:
    processes, per_process = 4, 2500
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"worker-{i}.json" for i in range(processes)]
    workers = [
        context.Process(
            target=hammer,
            args=(str(tmp_path / "state"), f"w{i}", per_process, str(outputs[i]), GPUS, i),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0

    results = [json.loads(out.read_text()) for out in outputs]
    intervals: list[Interval] = [
        (g, j, int(a), int(b)) for r in results for g, j, a, b in r["intervals"]
    ]
    conflicts = sum(r["conflicts"] for r in results)
    assert overlaps(intervals) == []
    # The run really contended: many claims were granted and many refused.
    assert len({i[1] for i in intervals}) > 1000
    assert conflicts > 100


def test_whole_gpus_and_their_mig_instances_are_never_held_at_once(tmp_path: Path) -> None:
    processes, per_process = 4, 1000
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"worker-{i}.json" for i in range(processes)]
    inventory = str(MIG_DIR / "inventory.json")
    workers = [
        context.Process(
            target=hammer_mig,
            args=(str(tmp_path / "state"), f"w{i}", per_process, str(outputs[i]), inventory, i),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
        assert worker.exitcode == 0

    results = [json.loads(out.read_text()) for out in outputs]
    intervals: list[Interval] = [
        (g, j, int(a), int(b)) for r in results for g, j, a, b in r["intervals"]
    ]
    assert overlaps(intervals) == []
    assert len({i[1] for i in intervals}) > 500
    assert sum(r["conflicts"] for r in results) > 50
    # Two instances of one GPU did run side by side: instances do not exclude each other.
    inventory_gpus = from_static_file(MIG_DIR / "inventory.json")
    gpu0 = [m.uuid for m in inventory_gpus.gpus[0].mig]
    pairs = [(g, j, a, b) for g, j, a, b in intervals if g in gpu0]
    assert overlaps([(gpu0[0], j, a, b) for _, j, a, b in pairs]) != []
