"""GPU drain and health: the store's section (serialised with claims, backward
compatible), the NVML watcher over a fake NVML, and jobs told of unhealthy GPUs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.models import CancelRequest
from sandfleet.common.settings import GpuUnhealthyAction, Settings
from sandfleet.workers.gpu.claims import GpuClaimStore, GpuUnavailable, NotEnoughGpus
from sandfleet.workers.gpu.health import MAX_REASON_CHARS, GpuStates
from sandfleet.workers.gpu.health_watch import NvmlHealthWatch, nvml_watch, watch_gpu_health
from sandfleet.workers.gpu_health import GpuHealth
from sandfleet.workers.identity import WorkerIdentity
from tests.support.fakes import HOST, WORKER, Harness, harness, job
from tests.support.gpus import FOUR_UUIDS

UUIDS = FOUR_UUIDS
T = TypeVar("T")


def claim_any(store: GpuClaimStore, job_id: str, count: int) -> tuple[str, ...]:
    return store.claim_any(
        job_id=job_id, count=count, candidates=UUIDS, device_for=str, driver="d", worker_id="w"
    ).gpus


# ---- the store ----


def test_a_drained_gpu_is_never_handed_out_until_undrained(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    store.drain(UUIDS[0], reason="fan swap", by="ops")
    with pytest.raises(GpuUnavailable) as unavailable:
        store.claim(job_id="a", gpus=[UUIDS[0]], devices=["0"], driver="d", worker_id="w")
    assert str(unavailable.value) == f"{UUIDS[0]} drained: fan swap"
    assert claim_any(GpuClaimStore(tmp_path), "b", 3) == tuple(UUIDS[1:])  # another process
    with pytest.raises(NotEnoughGpus) as short:
        claim_any(store, "c", 1)
    assert f"{UUIDS[0]} drained: fan swap" in str(short.value)
    assert "0 free" in str(short.value)
    store.undrain(UUIDS[0])
    assert claim_any(store, "c", 1) == (UUIDS[0],)


def test_an_unhealthy_gpu_is_not_free_and_a_claim_on_it_stays(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    store.claim(job_id="a", gpus=[UUIDS[1]], devices=["1"], driver="d", worker_id="w")
    first = store.mark_unhealthy(UUIDS[1], "Xid 79: GPU has fallen off the bus")
    again = store.mark_unhealthy(UUIDS[1], "another reason")
    assert again.unhealthy[UUIDS[1]] == first.unhealthy[UUIDS[1]]  # since its first mark
    store.mark_unhealthy(UUIDS[2], "stopped answering")
    assert [c.job_id for c in store.claims()] == ["a"]  # a mark takes no claim away
    assert store.free(UUIDS) == [UUIDS[0], UUIDS[3]]
    assert store.unavailable() == {
        UUIDS[1]: "unhealthy: Xid 79: GPU has fallen off the bus",
        UUIDS[2]: "unhealthy: stopped answering",
    }
    store.mark_healthy(UUIDS[2])
    assert store.free(UUIDS) == [UUIDS[0], UUIDS[2], UUIDS[3]]


def test_drained_and_unhealthy_together_say_both(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    store.mark_unhealthy(UUIDS[0], "Xid 48: double-bit ECC error")
    store.drain(UUIDS[0], reason="RMA", by="ops")
    assert store.unavailable() == {
        UUIDS[0]: "drained: RMA; unhealthy: Xid 48: double-bit ECC error"
    }
    row = store.states().row(UUIDS[0])
    assert (row["health"], row["drained"], row["drained_by"]) == ("unhealthy", True, "ops")
    store.undrain(UUIDS[0])
    assert UUIDS[0] in store.unavailable()  # still unhealthy


def test_a_file_from_before_drains_loads_and_keeps_its_claims(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    store.claim(job_id="a", gpus=[UUIDS[0]], devices=["0"], driver="d", worker_id="w")
    path = tmp_path / "gpu" / "claims.json"
    raw = json.loads(path.read_text())
    del raw["gpu_states"]
    path.write_text(json.dumps(raw))
    assert store.states() == GpuStates()
    store.drain(UUIDS[1], reason="", by="ops")
    assert [c.job_id for c in store.claims()] == ["a"]
    assert list(json.loads(path.read_text())["gpu_states"]["drained"]) == [UUIDS[1]]


def test_a_reason_is_bounded_and_one_line(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path)
    states = store.drain(UUIDS[0], reason="a\nb" + "x" * 10_000, by="o\x1bps")
    drain = states.drained[UUIDS[0]]
    assert len(drain.reason) == MAX_REASON_CHARS and drain.reason.startswith("a b")
    assert drain.by == "o ps"


# ---- the watcher, over a fake NVML ----


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


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


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


# ---- jobs on GPUs turned unhealthy ----


def gpu_health(h: Harness, tmp_path: Path, action: GpuUnhealthyAction) -> GpuHealth:
    settings = Settings(
        state_dir=tmp_path / "state", gpu_unhealthy_action=action, gpu_health_seconds=0.1
    )
    identity = WorkerIdentity(worker_id=WORKER, driver=h.driver.name, host=HOST)
    return GpuHealth(settings, h.inventory, h.claims, identity)


async def running_on_gpu(h: Harness, gpu: int) -> asyncio.Task[None]:
    """Job "a" on GPU `gpu`, started and running (60 s) until stopped."""
    started = asyncio.Event()

    async def on_wait(subject: str) -> None:
        started.set()

    h.driver.hooks["wait"] = on_wait
    request = job("a", gpus=1, gpu_ids=[f"nvidia.com/gpu={gpu}"], run_seconds=60)
    task = asyncio.create_task(h.runner.handle(h.delivery(request)))
    await within(started.wait())
    return task


async def end(h: Harness, task: asyncio.Task[None]) -> None:
    await h.runner.cancel(CancelRequest(job_id="a", reason="test over"))
    await within(task)
    assert h.events.last("a").phase is Phase.CANCELLED


async def test_a_job_on_a_gpu_turned_unhealthy_gets_one_note_and_runs_on(tmp_path: Path) -> None:
    h = harness(tmp_path)
    health = gpu_health(h, tmp_path, GpuUnhealthyAction.NOTE)
    task = await running_on_gpu(h, 2)
    await health.check(h.runner, h.events)
    assert [e.reason for e in h.events.of("a")][-1] == "Started"  # healthy: nothing said
    h.claims.mark_unhealthy(UUIDS[2], "Xid 79: GPU has fallen off the bus")
    await health.check(h.runner, h.events)
    await health.check(h.runner, h.events)
    notes = [e for e in h.events.of("a") if e.reason == "GpuUnhealthy"]
    assert [(e.phase, e.message) for e in notes] == [
        (Phase.RUNNING, f"GPU {UUIDS[2]} is unhealthy: Xid 79: GPU has fallen off the bus")
    ]
    assert not task.done()
    assert health.rows()[2]["health"] == "unhealthy"
    await end(h, task)


async def test_by_setting_the_job_is_stopped_and_fails_gpu_unhealthy(tmp_path: Path) -> None:
    h = harness(tmp_path)
    health = gpu_health(h, tmp_path, GpuUnhealthyAction.STOP)
    task = await running_on_gpu(h, 1)
    h.claims.mark_unhealthy(UUIDS[1], "stopped answering NVML: NVMLError_GpuIsLost")
    await health.check(h.runner, h.events)
    await within(task)
    phases = [(e.phase, e.reason) for e in h.events.of("a")][-2:]
    assert phases == [(Phase.RUNNING, "GpuUnhealthy"), (Phase.FAILED, "GpuUnhealthy")]
    assert "NVMLError_GpuIsLost" in h.events.last("a").message
    assert h.gpus_held() == {}  # cleaned up: the claim went with the sandbox


async def test_a_drained_gpus_job_runs_on_untold(tmp_path: Path) -> None:
    h = harness(tmp_path)
    health = gpu_health(h, tmp_path, GpuUnhealthyAction.STOP)
    task = await running_on_gpu(h, 0)
    h.claims.drain(UUIDS[0], reason="maintenance", by="ops")
    await health.check(h.runner, h.events)
    assert not task.done()
    assert not [e for e in h.events.of("a") if e.reason == "GpuUnhealthy"]
    assert health.rows()[0]["drained"] is True
    await end(h, task)


async def test_a_job_asking_for_a_drained_gpu_is_parked_holding_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.claims.drain(UUIDS[2], reason="maintenance", by="ops")
    await within(h.runner.handle(h.delivery(job("a", gpus=1, gpu_ids=["nvidia.com/gpu=2"]))))
    waiting = h.events.last("a")
    assert (waiting.phase, waiting.reason) == (Phase.WAITING, "GpusUnavailable")
    assert waiting.message == f"{UUIDS[2]} drained: maintenance"
    assert [parked.job_id for parked, _, _ in h.queues.parked] == ["a"]
    assert h.gpus_held() == {}


class FailingNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise NVMLError("NVML Shared Library Not Found")


async def test_the_worker_runs_the_watch_and_says_so(tmp_path: Path) -> None:
    h = harness(tmp_path)
    health = gpu_health(h, tmp_path, GpuUnhealthyAction.NOTE)
    assert health.source == "none"
    nvml = FakeNvml(UUIDS)
    nvml.lost = {UUIDS[1]}
    health.start(nvml)
    assert health.source == "nvml"

    async def marked() -> None:
        while UUIDS[1] not in h.claims.states().unhealthy:  # noqa: ASYNC110 - a file
            await asyncio.sleep(0.02)

    await within(marked())
    await health.aclose()
    assert health.source == "none" and nvml.shut
    broken = gpu_health(h, tmp_path, GpuUnhealthyAction.NOTE)
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
