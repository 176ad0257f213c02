"""The pure parts of the VM driver's warm guests: the job's frame on the channel, the
channel in the domain XML, the metadata that says whose a domain is, and telling when
the guest printed a marker."""

from __future__ import annotations

import asyncio
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from sandfleet.workers.drivers.base import LABEL_GPUS, LABEL_JOB_ID, LABEL_POOL, LABEL_WORKER_ID
from sandfleet.workers.drivers.vm.console_follow import _LineSeen, wait_for_line
from sandfleet.workers.drivers.vm.domain_xml import (
    DomainPlan,
    domain_xml,
    metadata_element,
    metadata_xml,
    read_owner,
)
from sandfleet.workers.drivers.vm.guest import CHANNEL_NAME, WAIT_ARGUMENT, job_frame, job_script

# What the guest's /init does with its port (scripts/make-vm-initramfs), on a file.
GUEST_READ = '{ read -r size && head -c "$size" > "$1"; } < "$2"'


def test_a_guest_reads_exactly_the_job_script_from_its_frame(tmp_path: Path) -> None:
    environment = {"MULTI": "line one\nline $two", "EMPTY": ""}
    command = ["sh", "-c", "printf '%s' \"$MULTI\"; exit 4"]
    # Whatever follows the frame is not the job's.
    (tmp_path / "port").write_bytes(job_frame(command, environment) + b"echo not the job\n")
    subprocess.run(
        ["busybox", "sh", "-c", GUEST_READ, "sh", tmp_path / "job.sh", tmp_path / "port"],
        check=True,
    )
    assert (tmp_path / "job.sh").read_text() == job_script(command, environment)
    result = subprocess.run(["sh", tmp_path / "job.sh"], capture_output=True, check=False)
    assert (result.stdout, result.returncode) == (b"line one\nline $two", 4)


def test_a_frames_length_counts_bytes_not_characters() -> None:
    frame = job_frame(["echo", "héllo ✓"], {})
    size, script = frame.split(b"\n", 1)
    assert int(size) == len(script) > len(script.decode())


def plan(**overrides: object) -> DomainPlan:
    values: dict[str, object] = {
        "name": "sandfleet-_warm-abc",
        "domain_type": "qemu",
        "job_id": "",
        "worker_id": "w1",
        "gpus": (),
        "pci_devices": (),
        "cpu": 1.0,
        "memory_bytes": None,
        "kernel": "/boot/vmlinuz",
        "initrd": Path("/w/initrd.img"),
        "cmdline": "quiet",
        "console_log": Path("/w/console.log"),
        **overrides,
    }
    return DomainPlan(**values)  # type: ignore[arg-type]


def test_a_warm_guest_has_its_job_channel_and_is_told_to_wait() -> None:
    root = ET.fromstring(domain_xml(plan(job_channel=Path("/w/job.sock"), pool="p1")))
    [channel] = root.findall("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").attrib == {"mode": "bind", "path": "/w/job.sock"}  # type: ignore[union-attr]
    assert channel.find("target").attrib == {"type": "virtio", "name": CHANNEL_NAME}  # type: ignore[union-attr]
    assert root.findtext("os/cmdline", "").split()[-2:] == ["quiet", WAIT_ARGUMENT]


def test_a_cold_guest_has_no_channel_and_never_waits() -> None:
    root = ET.fromstring(domain_xml(plan(job_id="j1", name="sandfleet-j1")))
    assert root.findall("devices/channel") == []
    assert WAIT_ARGUMENT not in root.findtext("os/cmdline", "")


def owner_of(root: ET.Element) -> ET.Element:
    [element] = list(root.find("metadata") or [])
    return element


def test_an_untaken_warm_guest_is_its_pools_and_no_jobs() -> None:
    owner = read_owner(
        ET.tostring(owner_of(ET.fromstring(domain_xml(plan(pool="p1")))), encoding="unicode")
    )
    assert owner.labels == {LABEL_WORKER_ID: "w1", LABEL_GPUS: "", LABEL_POOL: "p1"}
    assert owner.taken_at is None


def test_a_taken_guests_metadata_names_the_job_its_labels_and_when() -> None:
    taken = datetime(2026, 11, 27, 12, 0, 1, 250000, tzinfo=UTC)
    # Any character a label may hold, control characters too (XML can hold none).
    labels = {"team": 'a "b" <c>\nd & $e \x01\x1f \ufffe', LABEL_JOB_ID: "j9", "w\x00": "\\"}
    labels[LABEL_WORKER_ID] = "w2"
    element = metadata_element("j9", "w2", (), pool="p1", taken_at=taken, labels=labels)
    text = metadata_xml(element)
    # libvirt's setMetadata puts it in our namespace, and refuses one that names its own.
    assert "xmlns" not in text
    owner = read_owner(text)
    assert owner.labels == {**labels, LABEL_GPUS: "", LABEL_POOL: "p1"}
    assert owner.taken_at == taken


def test_a_cold_guest_carries_its_jobs_labels() -> None:
    root = ET.fromstring(domain_xml(plan(job_id="j1", labels={"team": "x"})))
    owner = read_owner(ET.tostring(owner_of(root), encoding="unicode"))
    assert owner.labels == {"team": "x", LABEL_JOB_ID: "j1", LABEL_WORKER_ID: "w1", LABEL_GPUS: ""}


async def seen(console: Path, line: str, *, stopped: bool) -> bool:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    if stopped:
        future.set_result(0)
    return await asyncio.wait_for(wait_for_line(console, line, future), 5)


async def test_a_marker_counts_only_on_a_line_of_its_own(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"echo SANDFLEET_BEGIN\r\nSANDFLEET_BEGINS\r\n")
    assert not await seen(console, "SANDFLEET_BEGIN", stopped=True)
    console.write_bytes(b"SANDFLEET_BEGIN\r\n")  # the console's first line
    assert await seen(console, "SANDFLEET_BEGIN", stopped=True)
    assert not await seen(tmp_path / "none.log", "SANDFLEET_BEGIN", stopped=True)


def test_a_marker_cut_anywhere_between_reads_is_seen() -> None:
    printed = b"[ 0.1] boot\r\nSANDFLEET_WAITING\r\nmore\r\n"
    for cut in range(1, len(printed)):
        for second_cut in range(cut, len(printed)):
            seen = _LineSeen("SANDFLEET_WAITING")
            chunks = (printed[:cut], printed[cut:second_cut], printed[second_cut:])
            assert any([seen.feed(chunk) for chunk in chunks]), (cut, second_cut)


async def test_a_marker_printed_while_waiting_is_seen(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"[ 0.1] boot\r\n")
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_for_line(console, "SANDFLEET_WAITING", future))
    with console.open("ab") as file:
        file.write(b"SANDFLEET_WAITING\r\n")
    assert await asyncio.wait_for(waiting, 5)


async def test_a_guest_that_stopped_ends_the_wait(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"Kernel panic\r\n")
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_for_line(console, "SANDFLEET_BEGIN", future))
    future.set_result(0)
    assert not await asyncio.wait_for(waiting, 5)
