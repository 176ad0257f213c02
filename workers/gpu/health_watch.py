"""Watching the host's GPUs through NVML: a critical Xid, or a GPU that stops answering,
marks it unhealthy in the claim store (no new claim takes it; `sandfleet.workers.
gpu_health` tells, and by setting stops, the jobs on it).

Without NVML (the optional `nvml` extra, or no driver) there is no watcher: heartbeats
say `gpu_health_source: "none"`, and GPUs turn unhealthy only when marked by hand.

The watcher is blocking (`nvmlEventSetWait`); it runs in a thread, one bounded wait at
a time, so it ends within one wait of being cancelled. Each worker on a host runs one:
marks are idempotent, so two watchers marking one GPU leave one mark.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sandfleet.workers.gpu.claims import GpuClaimStore

log = logging.getLogger(__name__)

# The Xids after which a GPU must not be handed out until an operator has looked at it
# (NVIDIA's Xid catalogue: each needs a GPU reset, or points at failing hardware).
# Left out: application faults (13, 31, 43, 45, 68, 109: one job's bug, the GPU is
# fine), 63 (a page retirement or row remap was *recorded*: the repair worked) and 94
# (a contained ECC error: only the job that touched the memory is hit).
CRITICAL_XIDS: Mapping[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}

# NVML's errors that mean the GPU itself no longer answers (not: "not supported").
_LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_Unknown", "NVMLError_ResetRequired")
# Events read after one wait, at most: a storm of Xids cannot hold the thread.
_MAX_EVENTS_PER_WAIT = 64

Mark = tuple[str, str]  # (GPU UUID, why it is unhealthy)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlHealthWatch:
    """Xid events and liveness polls over `nvml`: the pynvml module, or (in tests) any
    object with its names. Blocking: call it from a thread."""

    def __init__(
        self, nvml: Any, uuids: Sequence[str], *, critical: Mapping[int, str] = CRITICAL_XIDS
    ) -> None:
        self._nvml = nvml
        self._uuids = list(uuids)
        self._critical = critical
        self._events: Any = None
        self._lost = tuple(getattr(nvml, name) for name in _LOST_ERRORS if hasattr(nvml, name))
        self.registered: list[str] = []  # GPUs whose Xid events it receives

    def open(self) -> None:
        """Initialise NVML and register every GPU's critical-Xid events (a GPU that
        cannot deliver them is still polled)."""
        nvml = self._nvml
        nvml.nvmlInit()
        self._events = nvml.nvmlEventSetCreate()
        for uuid in self._uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self._events
                )
            except nvml.NVMLError as exc:
                log.warning("GPU %s: no Xid events from NVML (%s); polled only", uuid, exc)
            else:
                self.registered.append(uuid)

    def close(self) -> None:
        nvml = self._nvml
        try:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.warning("NVML shutdown: %s", exc)
        self._events = None

    def check(self, timeout_ms: int) -> list[Mark]:
        """Wait up to `timeout_ms` for Xid events, then ask each GPU whether it answers:
        the GPUs found unhealthy, with why."""
        return self._critical_xids(timeout_ms) + self._unanswering()

    def _critical_xids(self, timeout_ms: int) -> list[Mark]:
        marks: list[Mark] = []
        for _ in range(_MAX_EVENTS_PER_WAIT):
            try:
                data = self._nvml.nvmlEventSetWait(self._events, timeout_ms)
            except self._nvml.NVMLError_Timeout:
                break
            except self._nvml.NVMLError as exc:
                log.warning("waiting for NVML events: %s", exc)
                break
            timeout_ms = 0  # then only what is pending already
            if (mark := self._xid_mark(data)) is not None:
                marks.append(mark)
        return marks

    def _xid_mark(self, data: Any) -> Mark | None:
        xid = int(data.eventData)
        try:
            uuid = _text(self._nvml.nvmlDeviceGetUUID(data.device))
        except self._nvml.NVMLError as exc:  # the poll finds a GPU too far gone to name
            log.error("Xid %d on a GPU NVML cannot name (%s)", xid, exc)
            return None
        if xid not in self._critical:
            log.info("GPU %s: Xid %d (not critical: the GPU stays in service)", uuid, xid)
            return None
        return uuid, f"Xid {xid}: {self._critical[xid]}"

    def _unanswering(self) -> list[Mark]:
        nvml, marks = self._nvml, []
        for uuid in self._uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            except self._lost as exc:
                marks.append((uuid, f"stopped answering NVML: {type(exc).__name__}"))
            except nvml.NVMLError as exc:  # e.g. no temperature sensor: not a sign of loss
                log.debug("GPU %s: %s", uuid, exc)
        return marks


def nvml_watch(uuids: Sequence[str], nvml: Any = None) -> NvmlHealthWatch | None:
    """A watcher over pynvml for these GPUs; None without GPUs or without pynvml."""
    if not uuids:
        return None
    if nvml is None:
        try:
            import pynvml  # noqa: PLC0415 - optional native extra

            nvml = pynvml
        except ImportError:
            return None
    return NvmlHealthWatch(nvml, uuids)


async def watch_gpu_health(watch: NvmlHealthWatch, store: GpuClaimStore, seconds: float) -> None:
    """Mark each GPU `watch` finds unhealthy, until cancelled; at once if NVML does not
    start (no driver loaded: the watch is off)."""
    try:
        await asyncio.to_thread(watch.open)
    except Exception as exc:
        log.warning("GPU health watch is off: NVML did not start (%s)", exc)
        return
    checking: asyncio.Future[list[Mark]] | None = None
    try:
        while True:
            checking = asyncio.ensure_future(asyncio.to_thread(watch.check, int(seconds * 1000)))
            try:
                for uuid, reason in await asyncio.shield(checking):
                    await _mark(store, uuid, reason)
            except Exception:  # one failed round must not end the watch
                log.exception("GPU health watch")
                await asyncio.sleep(seconds)
    finally:
        # A cancelled wait still runs in its thread (for at most `seconds`): NVML's
        # event set is freed only after it.
        if checking is not None:
            await asyncio.wait([checking])
        await asyncio.to_thread(watch.close)


async def _mark(store: GpuClaimStore, uuid: str, reason: str) -> None:
    before = await asyncio.to_thread(store.states)
    await asyncio.to_thread(store.mark_unhealthy, uuid, reason)
    if uuid not in before.unhealthy:
        log.error("GPU %s is unhealthy (%s): no new job will get it", uuid, reason)
