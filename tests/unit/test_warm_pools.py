"""Warm pools: their profiles (pure parsing) and the runner taking their sandboxes,
against the in-memory driver (no broker, no runtime: tests/integration/test_warm_jobs.py
runs them on dockerd)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.errors import SandboxError
from sandfleet.common.events import Phase
from sandfleet.common.models import CancelRequest, Job
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_POOL,
    LABEL_WORKER_ID,
    WARM_NAME_PREFIX,
    SandboxSpec,
    WarmSpec,
    sandbox_name,
)
from sandfleet.workers.metrics import WorkerMetrics
from sandfleet.workers.slots import Slots
from sandfleet.workers.stage_timings import STARTED
from sandfleet.workers.warm_pools import WarmPools, bound_pools
from sandfleet.workers.warm_profiles import PoolProfile, WarmPoolsInvalid, warm_profiles
from tests.support.fakes import WORKER, Harness, harness, job
from tests.support.metrics import scraped

R = Phase.RUNNING
PROFILE = PoolProfile(image="none", count=2)


async def within(step: Awaitable[Any], seconds: float = 5) -> Any:
    async with asyncio.timeout(seconds):
        return await step


async def filled(h: Harness) -> Harness:
    await h.warm.start()
    await within(h.warm.full.wait())
    return h


def warm_names(h: Harness) -> set[str]:
    return {name for name in h.driver.sandboxes if name.startswith(WARM_NAME_PREFIX)}


# ---- profiles ----


def test_profiles_come_from_the_setting_then_the_option() -> None:
    setting = json.dumps([{"image": "busybox", "count": 2, "cpu": "500m", "memory": "64Mi"}])
    first, second = warm_profiles(setting, ["alpine:3=4"])
    assert (first.image, first.count, first.cpu, first.memory) == ("busybox", 2, 0.5, 64 << 20)
    assert (second.image, second.count, second.cpu) == ("alpine:3", 4, None)


@pytest.mark.parametrize(
    ("setting", "options", "named"),
    [
        ('[{"image": "b", "count": 0}]', [], "SANDFLEET_WARM_POOLS[0].count"),
        ('[{"image": "b", "count": 65}]', [], "SANDFLEET_WARM_POOLS[0].count"),
        ('[{"image": "b", "count": 1, "cuda": 1}]', [], "SANDFLEET_WARM_POOLS[0].cuda"),
        ('[{"image": "b", "count": "2"}]', [], "SANDFLEET_WARM_POOLS[0].count"),
        ('[{"image": "b", "count": 1, "memory": "1Ki"}]', [], "SANDFLEET_WARM_POOLS[0].memory"),
        ('[{"image": "b", "count": 1}, "x"]', [], "SANDFLEET_WARM_POOLS[1]"),
        ('{"image": "b"}', [], "SANDFLEET_WARM_POOLS: must be a JSON list"),
        ("[", [], "SANDFLEET_WARM_POOLS: not JSON"),
        ("", ["busybox"], "--warm 'busybox': give IMAGE=COUNT"),
        ("", ["busybox=x"], "--warm 'busybox=x': give IMAGE=COUNT"),
        ("", ["=3"], "--warm '=3': give IMAGE=COUNT"),
        ("", ["busybox=99"], "--warm 'busybox=99'.count"),
        ("", ["b=1", "b=2"], "more than one profile for the same image and resources (b)"),
        ("", [f"i{n}=1" for n in range(17)], "at most 16 profiles"),
        ("", [f"i{n}=64" for n in range(5)], "320 warm sandboxes in all; at most 256"),
    ],
)
def test_a_bad_profile_is_refused_naming_where_it_is(
    setting: str, options: list[str], named: str
) -> None:
    with pytest.raises(WarmPoolsInvalid, match=re.escape(named)):
        warm_profiles(setting, options)


def test_a_profiles_key_is_its_shape_not_its_count() -> None:
    assert PoolProfile(image="b", count=1).key == PoolProfile(image="b", count=9).key
    assert PoolProfile(image="b", count=1).key != PoolProfile(image="b", count=1, cpu=1.0).key
    block = PoolProfile(image="b", count=1, driver_config={"exit_code": 1})
    assert block.key != PoolProfile(image="b", count=1).key


def test_a_profiles_block_is_checked_by_the_driver_and_named_as_the_profiles(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    profile = PoolProfile(image="none", count=1, driver_config={"run_seconds": -1})
    with pytest.raises(WarmPoolsInvalid, match=r"SANDFLEET_WARM_POOLS\[0\]\.driver_config\.run"):
        bound_pools(h.driver, [profile])


def test_a_driver_without_warm_sandboxes_refuses_profiles(tmp_path: Path) -> None:
    class ColdOnly:
        name = "cold"

        def parse_config(self, job: Job) -> Any:
            raise AssertionError("never asked")

    with pytest.raises(WarmPoolsInvalid, match="the cold driver keeps no warm sandboxes"):
        bound_pools(ColdOnly(), [PROFILE])  # type: ignore[arg-type]
    assert bound_pools(ColdOnly(), []) == []  # type: ignore[arg-type]


# ---- the runner taking warm sandboxes ----


async def test_a_matching_job_runs_in_a_warm_sandbox_which_is_removed_and_replaced(
    tmp_path: Path,
) -> None:
    block = {"output": "hello\n", "exit_code": 3}
    profile = PoolProfile(image="none", count=2, driver_config=block)
    h = await filled(harness(tmp_path, warm=[profile]))
    ready_before = set(h.warm.pools[0].ready)
    await within(h.runner.handle(h.delivery(job("a", output="hello\n", exit_code=3))))
    assert h.events.phases("a") == [R, Phase.FAILED]  # no `starting`: nothing was made
    assert h.events.of("a")[0].message.startswith("warm (pool ")
    assert (h.events.last("a").exit_code, h.events.last("a").output) == (3, "hello\n")
    operations = [op for op, _ in h.calls]
    assert "create" not in operations and "start" not in operations
    assert operations.count("take_warm") == 1
    taken = h.events.last("a").sandbox_id
    assert taken in ready_before
    assert sandbox_name("a") not in h.driver.sandboxes  # served one job, then removed
    entry = h.journal.read("a")
    assert entry is not None and entry.closed and entry.sandbox_id == taken
    assert entry.terminal is not None and entry.terminal.timings is not None
    await within(h.warm.full.wait())
    assert len(h.warm.pools[0].ready) == 2
    assert taken not in h.warm.pools[0].ready  # refilled with a new one, not the used one
    assert (h.warm.served_warm, h.warm.served_cold) == (1, 0)


@pytest.mark.parametrize(
    "fields",
    [
        {"exit_code": 1},  # another block
        {"gpus": 1},  # GPUs: devices are fixed when a sandbox is made
        {"command": ["x"], "image": "other"},
    ],
)
async def test_a_job_matching_no_profile_starts_cold(
    tmp_path: Path, fields: dict[str, Any]
) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    image = fields.pop("image", None)
    made = job("a", **fields)
    if image is not None:
        made = made.model_copy(
            update={"template": made.template.model_copy(update={"image": image})}
        )
    await within(h.runner.handle(h.delivery(made)))
    assert "create" in [op for op, _ in h.calls] and "take_warm" not in [op for op, _ in h.calls]
    assert len(h.warm.pools[0].ready) == 2
    assert (h.warm.served_warm, h.warm.served_cold) == (0, 1)


async def test_a_job_asking_other_resources_starts_cold(tmp_path: Path) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    made = job("a")
    made = made.model_copy(
        update={"resource_requirements": made.resource_requirements.model_copy(update={"cpu": 2.0})}
    )
    await within(h.runner.handle(h.delivery(made)))
    assert "take_warm" not in [op for op, _ in h.calls]


async def test_a_job_starts_cold_when_the_pool_is_empty(tmp_path: Path) -> None:
    h = harness(tmp_path, warm=[PROFILE])  # never filled
    await within(h.runner.handle(h.delivery(job("a"))))
    assert h.events.phases("a") == [Phase.STARTING, R, Phase.SUCCEEDED]
    assert h.warm.served_cold == 1


async def test_a_take_that_fails_costs_the_pool_one_sandbox_and_the_job_starts_cold(
    tmp_path: Path,
) -> None:
    """The failure may be the job's doing (a command its image cannot run): one bad
    job must not empty a pool."""
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    broken, spare = h.warm.pools[0].ready

    async def fails(sandbox_id: str) -> None:
        raise SandboxError("no command")

    h.driver.hooks["take_warm"] = fails
    await within(h.runner.handle(h.delivery(job("a"))))
    assert h.events.last("a").phase is Phase.SUCCEEDED
    assert "create" in [op for op, _ in h.calls]  # cold
    remaining = {s.sandbox_id for s in h.driver.sandboxes.values()}
    assert broken not in remaining and spare in remaining
    assert h.warm.pools[0].ready[0] == spare  # still ready (a refill may follow it)


async def test_a_job_setting_a_variable_a_shell_keeps_read_only_starts_cold(
    tmp_path: Path,
) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    made = job("a")
    template = made.template.model_copy(update={"environment": {"UID": "0"}})
    await within(h.runner.handle(h.delivery(made.model_copy(update={"template": template}))))
    assert "take_warm" not in [op for op, _ in h.calls]
    assert len(h.warm.pools[0].ready) == 2


async def test_a_take_refills_its_pool_only_after_a_while(tmp_path: Path) -> None:
    """The job just started gets the machine first (a guest's boot takes all of it)."""
    h = await filled(harness(tmp_path, warm=[PROFILE], refill_after_take_seconds=3600))
    await within(h.runner.handle(h.delivery(job("a"))))
    for _ in range(50):  # the refill loop would have run by now, were it asked to
        await asyncio.sleep(0)
    assert [op for op, _ in h.calls].count("create_warm") == 2  # the first fill only
    assert len(h.warm.pools[0].ready) == 1 and not h.warm.full.is_set()
    await h.warm.aclose()


async def test_a_job_cancelled_before_it_starts_leaves_the_pool_as_it_was(
    tmp_path: Path,
) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    h.cancellations.add("a")
    ready = list(h.warm.pools[0].ready)
    await within(h.runner.handle(h.delivery(job("a"))))
    assert h.events.last("a").reason == "CancelledBeforeStart"
    assert list(h.warm.pools[0].ready) == ready


async def test_a_warm_job_cancelled_while_it_runs_is_stopped(tmp_path: Path) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    waiting = asyncio.Event()

    async def note_wait(sandbox_id: str) -> None:
        waiting.set()

    h.driver.hooks["wait"] = note_wait
    running = asyncio.create_task(h.runner.handle(h.delivery(job("a", run_seconds=60))))
    await within(waiting.wait())
    await h.runner.cancel(CancelRequest(job_id="a", reason="stop it"))
    await within(running)
    assert h.events.last("a").phase is Phase.CANCELLED
    assert sandbox_name("a") not in h.driver.sandboxes


async def test_a_taken_over_warm_jobs_timeout_counts_from_when_it_was_taken(
    tmp_path: Path,
) -> None:
    """Its runtime start was its pool's (or unknown): the journal's mark says when the
    job began. Counted from adoption instead, this job would run its 3 s more."""
    h = harness(tmp_path, warm=[PROFILE])
    taken = job("a", run_seconds=60, timeout=3)
    h.alive.add("dead")
    entry = h.journal.take(taken, "dead")
    h.alive.discard("dead")
    block = h.driver.parse_config(taken)
    warm = await h.driver.create_warm(warm_spec(block, worker="dead"))
    spec = SandboxSpec.for_job(taken, block, driver="inmemory", worker_id="dead")
    state = await h.driver.take_warm(warm.sandbox_id, spec)
    assert state.started_at is None
    marks = {**entry.stage_marks, STARTED: datetime.now(UTC) - timedelta(seconds=10)}
    h.journal.write(entry.model_copy(update={"sandbox_id": state.sandbox_id, "stage_marks": marks}))
    for stale in h.journal.take_over_dead(WORKER):
        await within(h.runner.take_over(stale), seconds=2)
    assert h.events.phases("a") == [R, Phase.TIMED_OUT]
    assert h.events.of("a")[0].reason == "Adopted"


def warm_spec(block: Any, *, worker: str, pool: str = PROFILE.key) -> WarmSpec[Any]:
    return WarmSpec(
        name=f"{WARM_NAME_PREFIX}{uuid.uuid4().hex[:16]}",
        worker_id=worker,
        pool=pool,
        image="none",
        cpu=None,
        memory_bytes=None,
        config=block,
        labels={LABEL_DRIVER: "inmemory", LABEL_WORKER_ID: worker, LABEL_POOL: pool},
    )


# ---- the pools' life ----


async def test_idle_warm_sandboxes_of_dead_workers_are_removed_not_those_of_live_ones(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path, warm=[PROFILE])
    block = h.driver.parse_config(job("x"))
    h.alive.add("peer")
    dead = await h.driver.create_warm(warm_spec(block, worker="dead"))
    peer = await h.driver.create_warm(warm_spec(block, worker="peer"))
    await h.warm.remove_unowned()
    ids = {s.sandbox_id for s in h.driver.sandboxes.values()}
    assert dead.sandbox_id not in ids and peer.sandbox_id in ids


async def test_a_dead_workers_taken_warm_sandbox_is_left_for_its_jobs_take_over(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path, warm=[PROFILE])
    taken = job("a", run_seconds=60)
    block = h.driver.parse_config(taken)
    warm = await h.driver.create_warm(warm_spec(block, worker="dead"))
    spec = SandboxSpec.for_job(taken, block, driver="inmemory", worker_id="dead")
    await h.driver.take_warm(warm.sandbox_id, spec)
    await h.warm.remove_unowned()
    assert sandbox_name("a") in h.driver.sandboxes


async def test_stopping_the_pools_removes_every_idle_warm_sandbox(tmp_path: Path) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    assert len(warm_names(h)) == 2
    await h.warm.aclose()
    assert warm_names(h) == set()


async def test_an_ended_warm_sandbox_is_dropped_from_its_pool_and_replaced(
    tmp_path: Path,
) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    ended = h.warm.pools[0].ready[0]
    next(s for s in h.driver.sandboxes.values() if s.sandbox_id == ended).end(1)
    await h.warm.remove_unowned()
    assert ended not in {s.sandbox_id for s in h.driver.sandboxes.values()}
    await within(h.warm.full.wait())
    assert len(h.warm.pools[0].ready) == 2 and ended not in h.warm.pools[0].ready


async def test_a_failing_create_is_reported_and_tried_again(tmp_path: Path) -> None:
    h = harness(tmp_path, warm=[PROFILE])
    reported: list[str] = []

    async def fail_once(name: str) -> None:
        reported.append(h.warm.health()[0]["error"])
        if len(reported) == 1:
            raise SandboxError("no such image")

    h.driver.hooks["create_warm"] = fail_once
    await h.warm.start()
    await within(h.warm.full.wait())  # after a retry a second later
    assert reported == ["", "no such image", ""]  # said while it was so
    assert h.warm.health()[0] | {"pool": None} == {
        "pool": None, "image": "none", "ready": 2, "target": 2, "error": ""
    }  # fmt: skip
    await h.warm.aclose()


async def test_warm_pools_of_a_harness_without_profiles_do_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)
    await h.warm.start()
    await within(h.runner.handle(h.delivery(job("a"))))
    assert h.events.last("a").phase is Phase.SUCCEEDED
    assert isinstance(h.warm, WarmPools) and h.warm.health() == []
    await h.warm.aclose()


async def test_metrics_say_each_pools_ready_and_target_and_warm_and_cold_starts(
    tmp_path: Path,
) -> None:
    h = await filled(harness(tmp_path, warm=[PROFILE]))
    await within(h.runner.handle(h.delivery(job("a"))))  # warm
    await within(h.runner.handle(h.delivery(job("b", exit_code=1))))  # cold: another block
    metrics = WorkerMetrics(Slots(1), h.inventory, h.claims, h.warm)
    samples = scraped(metrics.registry)
    pool = ("image=none", f"pool={PROFILE.key}")
    assert samples[("sandfleet_warm_sandboxes", (*pool, "state=target"))] == 2
    assert samples[("sandfleet_warm_sandboxes", (*pool, "state=ready"))] in {1, 2}  # refilling
    assert samples[("sandfleet_job_starts_total", ("start=warm",))] == 1
    assert samples[("sandfleet_job_starts_total", ("start=cold",))] == 1
    await h.warm.aclose()
