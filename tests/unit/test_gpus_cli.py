"""`sandfleet gpus`, `gpus drain|undrain|healthy` on a fixture inventory, and the
fleet view built from heartbeats."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from sandfleet.cli import app
from sandfleet.common.events import Event, Phase, WorkerHealth
from sandfleet.gateway.gpus_fleet import fleet_report, fleet_table
from sandfleet.workers.gpu.claims import GpuClaimStore
from tests.support.gpus import FOUR_UUIDS, write_inventory

UUIDS = FOUR_UUIDS


def gpus(tmp_path: Path, *args: str) -> Any:
    env = {
        "SANDFLEET_GPU_INVENTORY": str(write_inventory(tmp_path / "gpus.json")),
        "SANDFLEET_STATE_DIR": str(tmp_path / "state"),
        "SANDFLEET_HOST": "gpuhost",
        "COLUMNS": "300",  # the table on one line per GPU
    }
    return CliRunner().invoke(app, ["gpus", *args], env=env)


def test_drain_by_any_alias_then_undrain(tmp_path: Path) -> None:
    drained = gpus(tmp_path, "drain", "0000:2c:00.0", "--reason", "fan swap")
    assert drained.exit_code == 0, drained.output
    assert f"drained GPU 2 ({UUIDS[2]}) on host gpuhost: fan swap" in drained.output
    report = json.loads(gpus(tmp_path, "--json").output)
    rows = {row["index"]: row for row in report["gpus"]}
    assert (rows[2]["drained"], rows[2]["drain_reason"]) == (True, "fan swap")
    assert rows[2]["drained_by"] and rows[2]["drained_since"]
    assert [rows[i]["drained"] for i in (0, 1, 3)] == [False, False, False]
    assert GpuClaimStore(tmp_path / "state").free(UUIDS) == [UUIDS[0], UUIDS[1], UUIDS[3]]
    table = gpus(tmp_path)
    assert table.exit_code == 0 and "drained: fan swap" in table.output
    undrained = gpus(tmp_path, "undrain", f"nvidia.com/gpu={UUIDS[2]}")
    assert undrained.exit_code == 0
    assert f"undrained GPU 2 ({UUIDS[2]})" in undrained.output
    assert GpuClaimStore(tmp_path / "state").free(UUIDS) == UUIDS
    again = gpus(tmp_path, "undrain", "2")
    assert "was not drained" in again.output


def test_draining_a_held_gpu_says_its_job_runs_on(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path / "state")
    store.claim(job_id="train", gpus=[UUIDS[1]], devices=["1"], driver="docker", worker_id="w")
    out = gpus(tmp_path, "drain", "1").output
    assert "job train holds it and runs on; no new job will get it" in out
    assert [c.job_id for c in store.claims()] == ["train"]


def test_an_unknown_gpu_is_an_error_naming_the_host_and_its_gpus(tmp_path: Path) -> None:
    result = gpus(tmp_path, "drain", "7")
    assert result.exit_code == 2
    assert "no GPU '7' on host gpuhost (its GPUs: 0, 1, 2, 3)" in result.output
    assert GpuClaimStore(tmp_path / "state").unavailable() == {}


def test_healthy_clears_an_unhealthy_mark(tmp_path: Path) -> None:
    store = GpuClaimStore(tmp_path / "state")
    store.mark_unhealthy(UUIDS[3], "Xid 79: GPU has fallen off the bus")
    assert "unhealthy: Xid 79" in gpus(tmp_path).output
    out = gpus(tmp_path, "healthy", "3").output
    assert "cleared GPU 3" in out and "Xid 79" in out
    assert store.unavailable() == {}


def beat(host: str, worker: str, at: datetime, gpus: list[dict[str, Any]]) -> Event:
    health = WorkerHealth(
        slots=1, free_slots=1, started_at=at, heartbeat_seconds=10, gpus=gpus,
        gpu_health_source="nvml",
    )  # fmt: skip
    return Event(
        job_id=None, phase=Phase.HEARTBEAT, reason="Alive", driver="docker", host=host,
        worker_id=worker, health=health, timestamp=at,
    )  # fmt: skip


def test_the_fleet_view_takes_each_hosts_latest_alive_heartbeat() -> None:
    now = datetime.now(UTC)
    sick = {"index": 0, "uuid": "GPU-b", "name": "H200", "health": "unhealthy",
            "health_reason": "Xid 48", "drained": False}  # fmt: skip
    beats = [
        beat("a", "a-old", now - timedelta(minutes=5), [{"index": 0, "uuid": "GPU-old"}]),
        beat("a", "a-new", now - timedelta(seconds=2), [{"index": 0, "uuid": "GPU-a"}]),
        beat("b", "b-1", now - timedelta(seconds=1), [sick]),
    ]
    hosts = fleet_report(beats, now)
    assert [(h["host"], h["worker_id"], h["state"]) for h in hosts] == [
        ("a", "a-new", "alive"),
        ("b", "b-1", "alive"),
    ]
    assert hosts[1]["gpus"][0]["health_reason"] == "Xid 48"
    table = fleet_table(hosts)
    assert table.row_count == 2
    cells = [str(cell) for cell in table.columns[4].cells]
    assert cells == ["?", "unhealthy: Xid 48"]  # a heartbeat from before GPU health: "?"
