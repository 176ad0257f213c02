"""GPU inventories for tests: the real H200 readings and a made-up 4-GPU host."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sandfleet.common.events import Event, Phase

H200_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "gpu-host-h200"
H200_UUID = "GPU-49431ef3-0f4f-2e8f-6567-eca72c1acedc"

# Run in a container: the test CDI devices (tests/fixtures/cdi) it sees and their env.
GPU_PROBE = "ls /dev | grep sandfleet-gpu; env | grep SANDFLEET_TEST_GPU | sort"

FOUR_UUIDS: list[str] = [f"GPU-0000000{i}-aaaa-bbbb-cccc-00000000000{i}" for i in range(4)]
FOUR_GPUS: dict[str, Any] = {
    "gpus": [
        {"index": i, "uuid": uuid, "name": "Test GPU", "pci_bus_id": f"0000:{0x2A + i:02x}:00.0"}
        for i, uuid in enumerate(FOUR_UUIDS)
    ]
}


def write_inventory(path: Path, data: Mapping[str, Any] = FOUR_GPUS) -> Path:
    path.write_text(json.dumps(data))
    return path


def double_holds(events: list[Event]) -> list[str]:
    """GPUs held by two jobs at once, judged from [last `claimed`, terminal] intervals."""
    claimed: dict[str, Event] = {}
    intervals: dict[str, list[tuple[datetime, datetime, str]]] = defaultdict(list)
    for event in events:
        if event.job_id is None:
            continue
        if event.phase is Phase.CLAIMED:
            claimed[event.job_id] = event
        elif event.phase.is_terminal and (start := claimed.pop(event.job_id, None)):
            for gpu in start.gpus:
                intervals[gpu].append((start.timestamp, event.timestamp, event.job_id))
    overlaps = []
    for gpu, spans in intervals.items():
        spans.sort()
        for (_, end, job), (begin, _, other) in itertools.pairwise(spans):
            if begin < end:
                overlaps.append(f"{gpu}: {job} and {other}")
    return overlaps


DGX_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "gpu-dgx-8"
MIG_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "gpu-mig"


def fixture_records(directory: Path) -> list[dict[str, Any]]:
    """The GPU records of a fixture's static inventory (inventory.json)."""
    records: list[dict[str, Any]] = json.loads((directory / "inventory.json").read_text())["gpus"]
    return records
