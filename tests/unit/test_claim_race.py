"""Many processes, one claim store: no GPU is ever held by two jobs at once."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
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


def hammered(
    tmp_path: Path, target: Callable[..., None], per_process: int, what: object, timeout: float
) -> tuple[list[Interval], int]:
    """4 processes running `target(state_dir, worker, per_process, out, what, seed)` on one
    store: every claim's interval, and how many claims were refused."""
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / f"worker-{i}.json" for i in range(4)]
    state = str(tmp_path / "state")
    workers = [
        context.Process(target=target, args=(state, f"w{i}", per_process, str(out), what, i))
        for i, out in enumerate(outputs)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=timeout)
        assert worker.exitcode == 0
    results = [json.loads(out.read_text()) for out in outputs]
    intervals: list[Interval] = [
        (g, j, int(a), int(b)) for r in results for g, j, a, b in r["intervals"]
    ]
    return intervals, sum(r["conflicts"] for r in results)


def test_four_processes_ten_thousand_operations_zero_overlaps(tmp_path: Path) -> None:
    intervals, conflicts = hammered(tmp_path, hammer, 2500, GPUS, timeout=120)
    assert overlaps(intervals) == []
    # The run really contended: many claims were granted and many refused.
    assert len({i[1] for i in intervals}) > 1000
    assert conflicts > 100


def test_whole_gpus_and_their_mig_instances_are_never_held_at_once(tmp_path: Path) -> None:
    inventory = str(MIG_DIR / "inventory.json")
    intervals, conflicts = hammered(tmp_path, hammer_mig, 1000, inventory, timeout=180)
    assert overlaps(intervals) == []
    assert len({i[1] for i in intervals}) > 500
    assert conflicts > 50
    # Two instances of one GPU did run side by side: instances do not exclude each other.
    inventory_gpus = from_static_file(MIG_DIR / "inventory.json")
    gpu0 = [m.uuid for m in inventory_gpus.gpus[0].mig]
    pairs = [(g, j, a, b) for g, j, a, b in intervals if g in gpu0]
    assert overlaps([(gpu0[0], j, a, b) for _, j, a, b in pairs]) != []
