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
    dac_group,
    domain_xml,
    parse_metadata,
)
from sandfleet.workers.drivers.vm.guest import exit_code, job_archive, job_output, job_script
from sandfleet.workers.drivers.vm.image_files import ImagePolicy
from sandfleet.workers.drivers.vm.plugin import VmSettings

BLOCK = "template.driver_config.vm"
IMAGES = ImagePolicy(
    dirs=(Path("/images"), Path("/srv/guests")),
    kernel_max_bytes=2**20,
    initrd_max_bytes=2**20,
    disk_max_bytes=2**30,
)
OUTSIDE = "must be a file inside SANDFLEET_VM_IMAGE_DIRS (/images:/srv/guests)"


def job(block: dict[str, Any], *, gpus: int | None = None, image: str = "/images/vmlinuz") -> Job:
    return Job(
        job_id="j1",
        driver="vm",
        resource_requirements=ResourceRequirements.model_validate({"gpu": {"count": gpus}}),
        template=JobTemplate(image=image, driver_config=block),
    )


def errors(block: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(RequestInvalid) as caught:
        parse_vm_block(job(block, **kwargs), IMAGES)
    return [(e.field, e.message) for e in caught.value.errors]


def test_valid_block_normalises_pci_addresses() -> None:
    block = parse_vm_block(
        job(
            {"initrd": "/images/i.img", "gpu_device_ids": ["00000000:2D:00.0", "0000:2e:00.0"]},
            gpus=2,
        ),
        IMAGES,
    )
    assert block.gpu_device_ids == ["0000:2d:00.0", "0000:2e:00.0"]


def test_two_spellings_of_one_pci_address_are_duplicates() -> None:
    assert errors(
        {"initrd": "/images/i", "gpu_device_ids": ["00000000:2d:00.0", "0000:2d:00.0"]}, gpus=2
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


@pytest.mark.parametrize(
    "image, block",
    [
        ("/boot/vmlinuz", {"initrd": "/images/i"}),
        ("/images/vmlinuz", {"initrd": "/proc/self/environ"}),
        ("/images/vmlinuz", {"initrd": "/images/i", "disk": "/etc/shadow", "disk_format": "raw"}),
        ("/images/vmlinuz", {"initrd": "/images", "disk": "/srv/guests-evil/d.raw"}),
    ],
)
def test_paths_outside_the_image_dirs_are_refused_by_field(
    image: str, block: dict[str, Any]
) -> None:
    paths = [
        ("template.image", image),
        (f"{BLOCK}.initrd", block["initrd"]),
        (f"{BLOCK}.disk", block.get("disk")),
    ]
    inside = ("/images/", "/srv/guests/")
    outside = [field for field, path in paths if path and not path.startswith(inside)]
    assert errors(block, image=image) == [(field, OUTSIDE) for field in outside]


def test_path_errors_come_with_the_blocks_own() -> None:
    found = errors({"initrd": "/etc/passwd", "cmdline": "a\nb"}, image="/etc/kernel")
    # The block's paths are checked once it parses; the kernel's always.
    assert {field for field, _ in found} == {"template.image", f"{BLOCK}.cmdline"}
    assert errors({"initrd": "/etc/passwd"}, image="/etc/kernel") == [
        ("template.image", OUTSIDE),
        (f"{BLOCK}.initrd", OUTSIDE),
    ]


def test_ids_need_a_matching_count() -> None:
    assert errors({"initrd": "/images/i", "gpu_device_ids": ["0000:2d:00.0"]}) == [
        (f"{BLOCK}.gpu_device_ids", "GPU IDs require resource_requirements.gpu.count")
    ]


def test_image_dirs_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path("/var/lib/sandfleet/guest") in VmSettings().image_dirs  # the dev guest's
    monkeypatch.setenv("SANDFLEET_VM_IMAGE_DIRS", "/srv/kernels:/srv/disks:")
    assert VmSettings().image_policy().dirs == (Path("/srv/kernels"), Path("/srv/disks"))
    for wrong in ("kernels", "/srv:/"):
        monkeypatch.setenv("SANDFLEET_VM_IMAGE_DIRS", wrong)
        with pytest.raises(ValueError, match="must be absolute paths, not /"):
            VmSettings()


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


def test_a_huge_exit_marker_is_no_exit_code_and_never_raises() -> None:
    """A guest printing an exit marker of thousands of digits once made the parse
    raise (int() refuses > 4300 digits), and with it every listing of the host's domains."""
    console = "SANDFLEET_BEGIN\nhi\nSANDFLEET_EXIT=" + "9" * 100_000 + "\n"
    assert exit_code(console) is None
    assert job_output(console, lines=5).startswith("hi\n")


@pytest.mark.parametrize(
    "marker, code",
    [("0", 0), ("007", 7), ("255", 255), ("256", None), ("1000", None), ("-1", None), ("", None)],
)
def test_exit_codes_are_in_range(marker: str, code: int | None) -> None:
    assert exit_code(f"SANDFLEET_EXIT={marker}\r\n") == code


def test_job_output_without_the_begin_marker_stops_at_the_exit_marker() -> None:
    """The console is read from its tail: the begin marker may be cut off."""
    console = "out 1\nout 2\nSANDFLEET_EXIT=0\nreboot: Power down\n"
    assert job_output(console, lines=9) == "out 1\nout 2\n"
    assert job_output(console, lines=0) == ""


CAPABILITIES = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+64055:+109</baselabel>
    <baselabel type='qemu'>libvirt-qemu:kvm</baselabel>
  </secmodel>
</host></capabilities>"""


def test_the_hypervisors_group_comes_from_libvirts_dac_label() -> None:
    assert dac_group(CAPABILITIES, "kvm") == "+109"
    assert dac_group(CAPABILITIES, "qemu") == "kvm"
    assert dac_group(CAPABILITIES, "test") is None
    assert dac_group("<capabilities><host/></capabilities>", "kvm") is None
    assert dac_group(CAPABILITIES.replace("+64055:+109", "+0:+0"), "kvm") is None
