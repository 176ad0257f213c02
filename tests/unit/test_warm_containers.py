"""Taking a warm container, apart from its runtime: who may take it, what it is sent,
and how `find` reports it once taken."""

from __future__ import annotations

from typing import Any

import pytest

from sandfleet.common.errors import SandboxError, SandboxNameTaken
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    LABEL_JOB_ID,
    LABEL_POOL,
    WARM_NAME_PREFIX,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
)
from sandfleet.workers.drivers.container_state import state_from_inspect
from sandfleet.workers.drivers.warm_containers import ImageDefaults, Waiting, WaitingContainers
from sandfleet.workers.drivers.warm_shim import job_lines

POOL_LABELS = {LABEL_DRIVER: "docker", LABEL_POOL: "p"}


class RecordedStdin:
    def __init__(self, *, open_: bool = True) -> None:
        self.is_open = open_
        self.sent: list[bytes] = []
        self.closed = False

    async def send_last(self, data: bytes) -> None:
        self.sent.append(data)
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def spec(job_id: str, command: tuple[str, ...] = ("run",)) -> SandboxSpec[Any]:
    return SandboxSpec(
        name=f"sandfleet-{job_id}", job_id=job_id, worker_id="w", image="i",
        command=command, environment={"A": "1"}, labels={}, cpu=None, memory_bytes=None,
        config=None,
    )  # fmt: skip


def holding(stdin: RecordedStdin, image: ImageDefaults | None = None) -> WaitingContainers:
    containers = WaitingContainers("docker")
    image = image or ImageDefaults(entrypoint=("ep",), cmd=("default",))
    containers.hold("c1", Waiting(stdin=stdin, image=image, labels=POOL_LABELS))
    return containers


class Runtime:
    """The runtime's side of a take: a rename, and the container's state after it."""

    def __init__(self, *, status: SandboxStatus = SandboxStatus.RUNNING) -> None:
        self.status = status
        self.name = "sandfleet-_warm-x"
        self.stdin: RecordedStdin | None = None  # nothing sent before the rename

    async def rename(self, sandbox_id: str, name: str) -> None:
        assert self.stdin is None or not self.stdin.sent
        self.name = name

    async def find(self, sandbox_id: str) -> SandboxState | None:
        return SandboxState(
            sandbox_id=sandbox_id, name=self.name, status=self.status, exit_code=None,
            started_at=None, labels=POOL_LABELS,
        )  # fmt: skip


async def name_taken(sandbox_id: str, name: str) -> None:
    raise SandboxNameTaken(f"{name} exists")


async def test_a_take_renames_then_sends_the_job_and_reports_it_running() -> None:
    stdin, runtime = RecordedStdin(), Runtime()
    runtime.stdin = stdin
    state = await holding(stdin).take("c1", spec("j1"), runtime.rename, runtime.find)
    assert runtime.name == "sandfleet-j1"
    assert stdin.sent == [job_lines(["ep", "run"], {"A": "1"})] and stdin.closed
    assert (state.name, state.status) == ("sandfleet-j1", SandboxStatus.RUNNING)


async def test_a_name_in_use_leaves_it_takeable() -> None:
    stdin, runtime = RecordedStdin(), Runtime()
    containers = holding(stdin)
    with pytest.raises(SandboxNameTaken):
        await containers.take("c1", spec("j1"), name_taken, runtime.find)
    assert not stdin.closed and not stdin.sent
    await containers.take("c1", spec("j2"), runtime.rename, runtime.find)
    assert stdin.sent


async def test_a_second_take_is_refused() -> None:
    containers, runtime = holding(RecordedStdin()), Runtime()
    await containers.take("c1", spec("j1"), runtime.rename, runtime.find)
    with pytest.raises(SandboxError, match="no warm container"):
        await containers.take("c1", spec("j2"), runtime.rename, runtime.find)


@pytest.mark.parametrize(
    ("stdin_open", "status"),
    [(False, SandboxStatus.RUNNING), (True, SandboxStatus.EXITED)],
    ids=["attach-ended", "runtime-says-exited"],
)
async def test_an_exited_container_is_refused_and_sent_nothing(
    stdin_open: bool, status: SandboxStatus
) -> None:
    stdin, runtime = RecordedStdin(open_=stdin_open), Runtime(status=status)
    with pytest.raises(SandboxError, match="no longer running"):
        await holding(stdin).take("c1", spec("j1"), runtime.rename, runtime.find)
    assert stdin.sent == [] and stdin.closed


async def test_no_command_at_all_is_refused() -> None:
    stdin, runtime = RecordedStdin(), Runtime()
    empty = ImageDefaults(entrypoint=(), cmd=())
    with pytest.raises(SandboxError, match="no command"):
        await holding(stdin, empty).take("c1", spec("j1", command=()), runtime.rename, runtime.find)
    assert stdin.sent == [] and stdin.closed


async def test_close_and_drop_close_the_held_stdin() -> None:
    stdin = RecordedStdin()
    await holding(stdin).aclose()
    assert stdin.closed
    dropped = RecordedStdin()
    await holding(dropped).drop("c1")
    assert dropped.closed


def inspect(name: str, labels: dict[str, str]) -> dict[str, Any]:
    state = {"Status": "running", "StartedAt": "2026-11-27T10:00:00.000000000Z"}
    return {"Id": "c1", "Name": f"/{name}", "State": state, "Config": {"Labels": labels}}


def test_a_taken_warm_container_is_the_jobs_by_its_name_and_has_no_start_of_its_own() -> None:
    state = state_from_inspect(inspect("sandfleet-j1", POOL_LABELS))
    assert (state.job_id, state.started_at) == ("j1", None)
    assert state.labels[LABEL_POOL] == "p"


def test_a_waiting_warm_container_has_no_job() -> None:
    state = state_from_inspect(inspect(f"{WARM_NAME_PREFIX}abc", POOL_LABELS))
    assert state.job_id is None and state.started_at is not None


def test_a_cold_container_keeps_its_labels() -> None:
    state = state_from_inspect(inspect("sandfleet-j1", {LABEL_JOB_ID: "j1"}))
    assert state.job_id == "j1" and state.started_at is not None
    assert state_from_inspect(inspect("sandfleet-j1", {})).job_id is None
