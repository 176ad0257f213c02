"""GPU inventories for tests: the real H200 readings and a made-up 4-GPU host."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

H200_DIR = Path(__file__).resolve().parent / "fixtures" / "gpu-host-h200"
H200_UUID = "GPU-49431ef3-0f4f-2e8f-6567-eca72c1acedc"

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
