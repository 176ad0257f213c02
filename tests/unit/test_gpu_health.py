"""GPU drain and health: the store's section (serialised with claims, backward
compatible), and jobs told of unhealthy GPUs (the watcher: test_gpu_health_watch.py)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.models import CancelRequest
from sandfleet.common.settings import GpuUnhealthyAction, Settings
from sandfleet.workers.gpu.claims import GpuClaimStore, GpuUnavailable, NotEnoughGpus
from sandfleet.workers.gpu.health import MAX_REASON_CHARS, GpuStates
from sandfleet.workers.gpu_health import GpuHealth
from sandfleet.workers.identity import WorkerIdentity
from tests.support.claim_race import claim_through_a_drain
from tests.support.fakes import HOST, WORKER, Harness, harness, job
from tests.support.gpus import FOUR_UUIDS

UUIDS = FOUR_UUIDS
T = TypeVar("T")


def claim_any(store: GpuClaimStore, job_id: str, count: int) -> tuple[str, ...]:
    return store.claim_any(
        job_id=job_id, count=count, candidates=UUIDS, device_for=str, driver="d", worker_id="w"
    ).gpus


async def within(step: Awaitable[T], seconds: float = 5) -> T:
    async with asyncio.timeout(seconds):
        return await step


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


def test_no_claim_started_after_a_drain_returns_takes_the_gpu(tmp_path: Path) -> None:
    """A drain and claims in other processes are serialised by the store's one lock."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    counts = [context.Value("i", 0) for _ in range(2)]
    outputs = [tmp_path / f"claims-{i}.json" for i in range(2)]
    processes = [
        context.Process(
            target=claim_through_a_drain,
            args=(str(tmp_path), f"w{i}", str(outputs[i]), counts[i], stop),
        )
        for i in range(2)
    ]
    for process in processes:
        process.start()
    store = GpuClaimStore(tmp_path)
    try:
        wait_for_claims(counts, at_least=50)
        store.drain("GPU-0", reason="race", by="test")
        drained_at = time.monotonic_ns()
        wait_for_claims(counts, at_least=max(c.value for c in counts) + 200)
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)
    claims = [claim for out in outputs for claim in json.loads(out.read_text())]
    before = [gpus for start, gpus in claims if start < drained_at]
    after = [gpus for start, gpus in claims if start > drained_at]
    assert ["GPU-0"] in before  # it was being claimed until the drain
    assert len(after) >= 200
    assert ["GPU-0"] not in after


def wait_for_claims(counts: list[Any], *, at_least: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(count.value < at_least for count in counts):
        assert time.monotonic() < deadline, [count.value for count in counts]
        time.sleep(0.01)  # other processes' progress: no event to wait on


def test_a_job_on_a_mig_instance_is_as_sick_as_its_gpu(tmp_path: Path) -> None:
    h = harness(tmp_path)
    health = gpu_health(h, tmp_path, GpuUnhealthyAction.NOTE)
    mig = "MIG-11111111-2222-3333-4444-555555555555"
    h.claims.claim(
        job_id="m", gpus=[mig], devices=["nvidia.com/gpu=2:0"], parents=[UUIDS[2]],
        driver=h.driver.name, worker_id=WORKER,
    )  # fmt: skip
    health.states = h.claims.mark_unhealthy(UUIDS[2], "Xid 79")
    assert health._sick_jobs(h.claims.claims()) == {"m": f"GPU {mig} is unhealthy: Xid 79"}
