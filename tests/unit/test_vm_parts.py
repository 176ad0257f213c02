"""The VM driver's pure parts: its block rules, domain XML, and the guest protocol."""

from __future__ import annotations

import gzip
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.errors import RequestInvalid
from sandfleet.common.models import Job, JobTemplate, ResourceRequirements
from sandfleet.workers.drivers.vm.config import parse_vm_block
from sandfleet.workers.drivers.vm.domain_xml import (
    METADATA_NS,
    DomainPlan,
    domain_xml,
    parse_metadata,
)
from sandfleet.workers.drivers.vm.guest import exit_code, job_archive, job_output, job_script

BLOCK = "template.driver_config.vm"


def job(block: dict[str, Any], *, gpus: int | None = None, image: str = "/boot/vmlinuz") -> Job:
    return Job(
        job_id="j1",
        driver="vm",
        resource_requirements=ResourceRequirements.model_validate({"gpu": {"count": gpus}}),
        template=JobTemplate(image=image, driver_config=block),
    )


def errors(block: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(RequestInvalid) as caught:
        parse_vm_block(job(block, **kwargs))
    return [(e.field, e.message) for e in caught.value.errors]


def test_valid_block_normalises_pci_addresses() -> None:
    block = parse_vm_block(
        job({"initrd": "/i.img", "gpu_device_ids": ["00000000:2D:00.0", "0000:2e:00.0"]}, gpus=2)
    )
    assert block.gpu_device_ids == ["0000:2d:00.0", "0000:2e:00.0"]


def test_two_spellings_of_one_pci_address_are_duplicates() -> None:
    assert errors(
        {"initrd": "/i", "gpu_device_ids": ["00000000:2d:00.0", "0000:2d:00.0"]}, gpus=2
    ) == [(f"{BLOCK}.gpu_device_ids", "duplicate IDs: ['0000:2d:00.0']")]


def test_block_rules_with_paths() -> None:
    found = errors(
        {"gpu_device_ids": ["nvidia.com/gpu=0"], "cmdline": "a\nb", "disk": "rel.qcow2", "nic": 1},
        gpus=1,
        image="vmlinuz",
    )
    fields = {field for field, _ in found}
    assert fields == {
        "template.image",
        f"{BLOCK}.initrd",
        f"{BLOCK}.gpu_device_ids.0",
        f"{BLOCK}.cmdline",
        f"{BLOCK}.disk",
        f"{BLOCK}.nic",
    }
    assert ("template.driver_config.vm.nic", "Extra inputs are not permitted") in found


def test_ids_need_a_matching_count() -> None:
    assert errors({"initrd": "/i", "gpu_device_ids": ["0000:2d:00.0"]}) == [
        (f"{BLOCK}.gpu_device_ids", "GPU IDs require resource_requirements.gpu.count")
    ]


def plan(**overrides: Any) -> DomainPlan:
    values: dict[str, Any] = {
        "name": "sandfleet-j1",
        "domain_type": "qemu",
        "job_id": "j1",
        "worker_id": "w1",
        "gpus": ("GPU-a", "GPU-b"),
        "pci_devices": ("0000:2d:00.0", "0000:2e:00.1"),
        "cpu": 1.5,
        "memory_bytes": 512 * 2**20,
        "kernel": "/boot/vmlinuz",
        "initrd": Path("/w/initrd.img"),
        "cmdline": "quiet",
        "console_log": Path("/w/console.log"),
        **overrides,
    }
    return DomainPlan(**values)


def test_domain_xml() -> None:
    root = ET.fromstring(domain_xml(plan()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "sandfleet-j1"
    assert root.findtext("memory") == str(512 * 1024)
    assert root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.findtext("os/initrd") == "/w/initrd.img"
    assert root.findtext("os/cmdline", "").startswith("console=ttyS0")
    assert root.findtext("on_poweroff") == "destroy"
    assert root.find("devices/serial/source").get("path") == "/w/console.log"  # type: ignore[union-attr]
    hostdevs = root.findall("devices/hostdev")
    assert [(h.get("mode"), h.get("type"), h.get("managed")) for h in hostdevs] == [
        ("subsystem", "pci", "yes")
    ] * 2
    assert hostdevs[1].find("source/address").attrib == {  # type: ignore[union-attr]
        "domain": "0x0000", "bus": "0x2e", "slot": "0x00", "function": "0x1"
    }  # fmt: skip
    meta = root.find(f"metadata/{{{METADATA_NS}}}job")
    assert meta is not None
    assert parse_metadata(ET.tostring(meta, encoding="unicode")) == {
        "id": "j1", "worker": "w1", "gpus": "GPU-a,GPU-b"
    }  # fmt: skip
    assert root.find("devices/disk") is None


def test_values_are_escaped_not_interpolated() -> None:
    hostile = 'x"/><devices><hostdev/></devices><x a="'
    root = ET.fromstring(domain_xml(plan(cmdline=hostile, pci_devices=())))
    assert root.findtext("os/cmdline", "").endswith(hostile)
    assert root.findall("devices/hostdev") == []


def test_disk_overlay_element() -> None:
    root = ET.fromstring(domain_xml(plan(disk=Path("/w/disk.qcow2"))))
    disk = root.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == "/w/disk.qcow2"  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]


def test_job_archive_is_a_cpio_with_the_job_script(tmp_path: Path) -> None:
    archive = job_archive(["sh", "-c", "echo 'it''s' $X"], {"X": "a b;c"})
    (tmp_path / "job.cpio").write_bytes(gzip.decompress(archive))
    subprocess.run(
        ["cpio", "-idm", "--quiet", "-F", str(tmp_path / "job.cpio")], cwd=tmp_path, check=True
    )
    script = tmp_path / "sandfleet" / "job.sh"
    assert script.read_text() == job_script(["sh", "-c", "echo 'it''s' $X"], {"X": "a b;c"})
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=False)
    assert result.stdout == "its a b;c\n"


def test_console_parsing() -> None:
    console = (
        "boot noise\r\nSANDFLEET_BEGIN\r\nhi\r\nthere\r\nSANDFLEET_EXIT=3\r\n[ 1.2] reboot\r\n"
    )
    assert exit_code(console) == 3
    assert job_output(console, lines=50) == "hi\nthere\n"
    assert job_output(console, lines=1) == "there\n"
    assert exit_code("kernel panic") is None
    assert job_output("a\nb\nc\n", lines=2) == "b\nc\n"
