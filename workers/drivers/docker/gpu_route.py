"""How a Docker Engine hands GPUs to a container, judged from its version and info:
CDI devices, else the NVIDIA device driver, else not at all (what to enable)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sandfleet.workers.drivers.base import ClaimedGpu

# Docker takes CDI device requests from Engine 25 (API 1.44), when its CDI feature is on.
CDI_MIN_ENGINE = (25, 0)
_ENABLE_CDI = 'daemon.json: {"features": {"cdi": true}}'


class GpuRoute(enum.Enum):
    CDI = "cdi"  # DeviceRequests Driver "cdi": the claimed GPUs' CDI names
    # DeviceRequests Driver "nvidia": dockerd's own driver, there when the NVIDIA
    # Container Toolkit's hook is on its PATH; it takes the claimed GPUs' UUIDs.
    NVIDIA = "nvidia"


@dataclass(frozen=True)
class GpuSupport:
    """An engine's route for GPUs; without one, `detail` says what to enable."""

    route: GpuRoute | None
    detail: str = ""


def engine_version(version: str) -> tuple[int, int]:
    major, _, rest = version.partition(".")
    minor = rest.split(".", 1)[0]
    try:
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


def gpu_support(version: str, info: Mapping[str, Any]) -> GpuSupport:
    """CDI where the engine has it on; else the NVIDIA runtime's device driver where the
    daemon has a runtime named `nvidia` (the toolkit's `nvidia-ctk runtime configure`
    registers it, its hook beside it); else none."""
    has_cdi = engine_version(version) >= CDI_MIN_ENGINE and bool(info.get("CDISpecDirs"))
    if has_cdi:
        return GpuSupport(GpuRoute.CDI)
    runtimes = info.get("Runtimes")
    if isinstance(runtimes, Mapping) and "nvidia" in runtimes:
        return GpuSupport(GpuRoute.NVIDIA)
    or_else = "or install the NVIDIA Container Toolkit (runtime `nvidia`), or use the podman driver"
    if engine_version(version) < CDI_MIN_ENGINE:
        detail = (
            f"Docker Engine {version} cannot inject CDI devices; GPU jobs need Docker >= 25 "
            f"with the CDI feature enabled ({_ENABLE_CDI}), {or_else}"
        )
    else:
        detail = (
            f"Docker Engine {version} has CDI turned off; enable it ({_ENABLE_CDI}) "
            f"and restart dockerd, {or_else}"
        )
    return GpuSupport(None, detail)


def device_requests(route: GpuRoute, gpus: Sequence[ClaimedGpu]) -> list[dict[str, Any]]:
    """HostConfig.DeviceRequests for the claimed GPUs, exactly those, by `route`."""
    if route is GpuRoute.CDI:
        return [{"Driver": "cdi", "DeviceIDs": [gpu.device for gpu in gpus]}]
    return [
        {"Driver": "nvidia", "DeviceIDs": [gpu.uuid for gpu in gpus], "Capabilities": [["gpu"]]}
    ]
