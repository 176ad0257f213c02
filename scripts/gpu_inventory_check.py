"""Compare GPU inventory discovery through NVML and through `nvidia-smi -q -x` on a real host.

    PYTHONPATH=. python3 scripts/gpu_inventory_check.py
Exits 1 when the two sources disagree on any GPU identity or alias.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from sandfleet.workers.gpu.inventory import InventoryError, discover, from_nvidia_smi, from_nvml


def main() -> int:
    results = {}
    for name, source in (("nvml", from_nvml), ("nvidia-smi", from_nvidia_smi)):
        try:
            inventory = source()
        except InventoryError as exc:
            print(f"{name}: unavailable: {exc}")
            return 1
        results[name] = inventory
        print(f"{name}: {len(inventory)} GPU(s)")
        for gpu in inventory:
            print("  " + json.dumps(gpu.as_dict()))
            print(f"    aliases: {sorted(gpu.aliases())}")
            sysfs = Path("/sys/bus/pci/devices") / gpu.pci_bus_id
            print(f"    sysfs {sysfs}: {'present' if sysfs.exists() else 'absent'}")
    # nvidia-smi names no MIG instance UUIDs: compare identity and topology only.
    same = [replace(g, mig=()) for g in results["nvml"]] == list(results["nvidia-smi"].gpus)
    print(f"discover() picked: {discover(None).source}")
    print("NVML and nvidia-smi agree" if same else "NVML and nvidia-smi DISAGREE")
    for gpu in results["nvml"]:
        for alias in sorted(gpu.aliases()):
            assert results["nvidia-smi"].resolve(alias).uuid == gpu.uuid, alias
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
