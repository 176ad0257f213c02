"""A stand-in for pynvml: the names the GPU health watcher uses, GPUs by UUID, Xid
events queued by the test, GPUs made to stop answering."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


class NVMLError_Timeout(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class FakeNvml:
    """pynvml's names the watcher uses: GPUs by UUID, a queue of Xid events."""

    NVMLError = NVMLError
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    nvmlEventTypeXidCriticalError = 8
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, uuids: list[str]) -> None:
        self.uuids = uuids
        self.xids: list[tuple[str, int]] = []
        self.lost: set[str] = set()
        self.no_sensor: set[str] = set()
        self.no_events: set[str] = set()
        self.registered: list[tuple[str, int]] = []
        self.shut = False

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlEventSetFree(self, events: str) -> None: ...

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return uuid

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:
        return handle.encode()

    def nvmlDeviceRegisterEvents(self, handle: str, types: int, events: str) -> None:
        if handle in self.no_events:
            raise NVMLError_NotSupported()
        self.registered.append((handle, types))

    def nvmlEventSetWait(self, events: str, timeout_ms: int) -> Any:
        if not self.xids:
            raise NVMLError_Timeout()
        uuid, xid = self.xids.pop(0)
        return SimpleNamespace(device=uuid, eventData=xid, eventType=8)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        if handle in self.lost:
            raise NVMLError_GpuIsLost()
        if handle in self.no_sensor:
            raise NVMLError_NotSupported()
        return 40
