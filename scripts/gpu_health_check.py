"""Check the NVML GPU health watcher on a real GPU host (issue 14's device check).

    PYTHONPATH=. python3 scripts/gpu_health_check.py [SECONDS]

Registers every GPU's critical-Xid events as a worker's watcher does, waits SECONDS
(default 3) for events and polls each GPU once, and prints what it found (a healthy
host: no marks). Exits 1 when NVML is missing, or no GPU could register its events.
"""

from __future__ import annotations

import sys
import time

from sandfleet.workers.gpu.health_watch import CRITICAL_XIDS, nvml_watch
from sandfleet.workers.gpu.inventory import InventoryError, from_nvml


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    try:
        inventory = from_nvml()
    except InventoryError as exc:
        print(f"NVML: unavailable: {exc}")
        return 1
    uuids = [gpu.uuid for gpu in inventory]
    watch = nvml_watch(uuids)
    if watch is None:
        print("no watcher: no GPUs, or pynvml is not installed")
        return 1
    watch.open()
    try:
        print(f"GPUs: {uuids}")
        print(f"registered for Xid events: {watch.registered}")
        print(f"critical Xids: {sorted(CRITICAL_XIDS)}")
        began = time.monotonic()
        marks = watch.check(int(seconds * 1000))
        print(f"one check took {time.monotonic() - began:.2f}s (wait {seconds}s, then a poll)")
        print(f"marks: {marks or 'none (healthy)'}")
    finally:
        watch.close()
    return 0 if watch.registered else 1


if __name__ == "__main__":
    sys.exit(main())
