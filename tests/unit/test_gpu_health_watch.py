"""The NVML GPU health watcher over a fake NVML: critical Xids and GPUs that stop
answering mark the store; the worker runs it where NVML is, and says so."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sandfleet.common.settings import Settings
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.gpu.health_watch import NvmlHealthWatch, nvml_watch, watch_gpu_health
from sandfleet.workers.gpu.inventory import GpuInventory, from_records
from sandfleet.workers.gpu_health import GpuHealth
from sandfleet.workers.identity import WorkerIdentity
from tests.support.gpus import FOUR_GPUS, FOUR_UUIDS
from tests.support.nvml import FakeNvml, NVMLError, NVMLError_Timeout

UUIDS = FOUR_UUIDS
T = TypeVar("T")


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


def opened(nvml: FakeNvml) -> NvmlHealthWatch:
    watch = NvmlHealthWatch(nvml, nvml.uuids)
    watch.open()
    return watch


def test_critical_xids_mark_their_gpu_and_others_do_not() -> None:
    nvml = FakeNvml(UUIDS)
    watch = opened(nvml)
    assert nvml.registered == [(uuid, 8) for uuid in UUIDS]
    nvml.xids = [(UUIDS[0], 13), (UUIDS[1], 79), (UUIDS[2], 63), (UUIDS[3], 48)]
    assert watch.check(100) == [
        (UUIDS[1], "Xid 79: GPU has fallen off the bus"),
        (UUIDS[3], "Xid 48: double-bit ECC error"),
    ]
    assert watch.check(100) == []  # each event counted once


def test_a_gpu_that_stops_answering_is_marked_one_without_a_sensor_is_not() -> None:
    nvml = FakeNvml(UUIDS)
    nvml.no_events = {UUIDS[2]}
    watch = opened(nvml)
    assert watch.registered == [UUIDS[0], UUIDS[1], UUIDS[3]]  # GPU 2 only polled
    nvml.lost, nvml.no_sensor = {UUIDS[2]}, {UUIDS[1]}
    assert watch.check(10) == [(UUIDS[2], "stopped answering NVML: NVMLError_GpuIsLost")]
    watch.close()
    assert nvml.shut


def test_no_watcher_without_gpus_or_without_pynvml() -> None:
    assert nvml_watch([]) is None
    try:
        import pynvml  # noqa: F401, PLC0415
    except ImportError:
        assert nvml_watch(UUIDS) is None
    assert nvml_watch(UUIDS, FakeNvml(UUIDS)) is not None


async def test_the_watch_marks_the_store_until_cancelled(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    nvml = FakeNvml(UUIDS)
    nvml.xids = [(UUIDS[3], 95)]
    task = asyncio.create_task(watch_gpu_health(NvmlHealthWatch(nvml, UUIDS), store, 0.1))

    async def marked() -> None:
        while UUIDS[3] not in store.states().unhealthy:  # noqa: ASYNC110 - another thread's file
            await asyncio.sleep(0.02)

    await within(marked())
    assert store.states().unhealthy[UUIDS[3]].reason == "Xid 95: uncontained ECC error"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert nvml.shut


def worker_gpu_health(tmp_path: Path) -> tuple[GpuHealth, GpuClaimStore]:
    settings = Settings(state_dir=tmp_path, gpu_health_seconds=0.1)
    store = GpuClaimStore(tmp_path)
    inventory = GpuInventory(from_records(FOUR_GPUS["gpus"]), source="test")
    identity = WorkerIdentity(worker_id="w", driver="d", host="h")
    return GpuHealth(settings, inventory, store, identity), store


class FailingNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise NVMLError("NVML Shared Library Not Found")


async def test_the_worker_runs_the_watch_and_says_so(tmp_path: Path) -> None:
    health, store = worker_gpu_health(tmp_path)
    assert health.source == "none"
    nvml = FakeNvml(UUIDS)
    nvml.lost = {UUIDS[1]}
    health.start(nvml)
    assert health.source == "nvml"

    async def marked() -> None:
        while UUIDS[1] not in store.states().unhealthy:  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.02)

    await within(marked())
    await health.aclose()
    assert health.source == "none" and nvml.shut
    broken, _ = worker_gpu_health(tmp_path)
    broken.start(FailingNvml(UUIDS))

    async def off() -> None:  # at once: NVML did not start
        while broken.source != "none":  # noqa: ASYNC110 - the watch task's end
            await asyncio.sleep(0.01)

    await within(off())
    await broken.aclose()


class SlowNvml(FakeNvml):
    """Each wait lasts its whole timeout, as NVML's does with no event; records a free of
    the event set while a wait still runs (a use-after-free in real NVML)."""

    def __init__(self, uuids: list[str]) -> None:
        super().__init__(uuids)
        self.waiting = threading.Event()
        self.freed_while_waiting = False

    def nvmlEventSetWait(self, events: str, timeout_ms: int) -> Any:
        self.waiting.set()
        time.sleep(timeout_ms / 1000)
        self.waiting.clear()
        raise NVMLError_Timeout()

    def nvmlEventSetFree(self, events: str) -> None:
        self.freed_while_waiting = self.waiting.is_set()


async def test_a_cancelled_watch_frees_nvml_only_after_its_wait_ends(tmp_path: Path) -> None:
    nvml = SlowNvml(UUIDS)
    task = asyncio.create_task(
        watch_gpu_health(NvmlHealthWatch(nvml, UUIDS), GpuClaimStore(tmp_path), 0.3)
    )
    await within(asyncio.to_thread(nvml.waiting.wait, 5))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert nvml.shut and not nvml.freed_while_waiting
