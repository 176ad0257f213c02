"""Many processes, one claim store: no GPU is ever held by two jobs at once."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from tests.support.claim_race import Interval, hammer, overlaps

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
