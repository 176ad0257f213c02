"""Property tests over what a VM job controls: its `vm` block, and the console its guest
writes. The block parser raises nothing but RequestInvalid, and what it accepts keeps
the driver's rules; the console parsers never raise and report exit codes in range."""

from __future__ import annotations

import re
import string
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import assume, event, given
from hypothesis import strategies as st
from pydantic import ValidationError

from sandfleet.common.errors import RequestInvalid
from sandfleet.common.models import Job
from sandfleet.workers.drivers.vm.config import VmBlock, parse_vm_block
from sandfleet.workers.drivers.vm.guest import MAX_EXIT_CODE, exit_code, job_output
from sandfleet.workers.drivers.vm.image_files import ImagePolicy
from sandfleet.workers.drivers.vm.job_files import CONSOLE_LOG, console_tail

IMAGE_DIRS = (Path("/images"), Path("/srv/guests"))
IMAGES = ImagePolicy(dirs=IMAGE_DIRS, kernel_max_bytes=1, initrd_max_bytes=1, disk_max_bytes=1)
NORMALISED_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
KNOWN_PATHS = [
    "/images/vmlinuz", "/srv/guests/i.img", "/images", "/images/../etc/shadow", "/etc/shadow",
    "/proc/self/environ", "/images-x/k", "vmlinuz", "", "/", "/images/a\0",
]  # fmt: skip
paths = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.builds(
        str.__add__,
        st.sampled_from(["/images/", "/srv/guests/", "/", "", "/images/.."]),
        st.text(max_size=30),
    ),
)
# Paths in the image dirs more often than not, so that blocks are accepted too.
near_paths = st.builds(
    str.__add__,
    st.sampled_from(["/images/", "/srv/guests/"]),
    st.text(alphabet=string.ascii_letters + "._-/", min_size=1, max_size=20),
)
pci_addresses = st.one_of(
    st.sampled_from(["0000:2d:00.0", "00000000:2D:00.0", "2e:00.1", "10000:00:00.0"]),
    st.text(alphabet="0123456789abcdefABCDEF:.", max_size=16),
)
blocks = st.fixed_dictionaries(
    {},
    optional={
        "initrd": paths | json_values,
        "disk": paths | json_values,
        "cmdline": st.text(max_size=40) | st.text(max_size=1100) | json_values,
        "disk_format": st.sampled_from(["qcow2", "raw", "vmdk"]) | json_values,
        "gpu_device_ids": st.lists(pci_addresses | json_values, max_size=4) | json_values,
        "nic": json_values,
    },
)
near_valid_blocks = st.fixed_dictionaries(
    {"initrd": near_paths | paths},
    optional={
        "disk": near_paths | paths,
        "cmdline": st.text(alphabet=string.printable, max_size=40),
        "disk_format": st.sampled_from(["qcow2", "raw", "vmdk"]),
        "gpu_device_ids": st.lists(pci_addresses, max_size=3),
    },
)


def vm_job(image: str, block: dict[str, Any], gpu_count: int | None) -> Job:
    try:
        return Job.model_validate(
            {
                "job_id": "fuzz-1",
                "driver": "vm",
                "resource_requirements": {"gpu": {"count": gpu_count}},
                "template": {"image": image, "driver_config": block},
            }
        )
    except ValidationError:
        assume(False)  # the job itself is the gateway's to refuse; not this parser's
        raise


def a_checked_path(path: str) -> bool:
    inside = any(Path(path).is_relative_to(d) and Path(path) != d for d in IMAGE_DIRS)
    return inside and "\0" not in path and ".." not in path.split("/")


def assert_keeps_the_rules(job: Job, block: VmBlock) -> None:
    assert a_checked_path(job.template.image)
    assert a_checked_path(block.initrd)
    assert block.disk is None or a_checked_path(block.disk)
    assert len(block.cmdline) <= 1024
    assert all(" " <= c <= "~" for c in block.cmdline)
    assert block.disk_format in ("qcow2", "raw")
    ids = block.gpu_device_ids
    assert all(NORMALISED_PCI.match(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert not ids or len(ids) == job.resource_requirements.gpu_count


@given(near_paths | paths, near_valid_blocks | blocks, st.none() | st.integers(0, 4))
def test_the_vm_block_parser_refuses_cleanly_or_keeps_the_rules(
    image: str, block: dict[str, Any], gpu_count: int | None
) -> None:
    job = vm_job(image, block, gpu_count)
    try:
        parsed = parse_vm_block(job, IMAGES)
    except RequestInvalid as refused:
        event("refused")
        assert refused.errors
        prefixes = ("template.image", "template.driver_config.vm")
        assert all(e.field.startswith(prefixes) and e.message for e in refused.errors)
        return
    event("accepted")
    assert_keeps_the_rules(job, parsed)


exit_markers = st.builds(
    "SANDFLEET_EXIT={}".format,
    st.one_of(
        st.integers(min_value=-5, max_value=10**40),
        st.text(alphabet=string.digits, max_size=5),
        st.text(alphabet=string.digits, min_size=4000, max_size=6000),  # int()'s limit: 4300
        st.text(max_size=5),
    ),
)
console_lines = st.lists(
    st.one_of(st.text(max_size=40), exit_markers, st.just("SANDFLEET_BEGIN")), max_size=12
)


@given(console_lines, st.sampled_from(["\n", "\r\n", "\r", "\r\r\n"]), st.integers(0, 30))
def test_the_console_parsers_never_raise_and_keep_exit_codes_in_range(
    lines: list[str], newline: str, wanted: int
) -> None:
    console = newline.join(lines) + newline
    code = exit_code(console)
    assert code is None or 0 <= code <= MAX_EXIT_CODE
    last = lines[-1] if lines else ""
    if re.fullmatch(r"SANDFLEET_EXIT=\d{1,3}", last) and int(last.split("=")[1]) <= 255:
        assert code == int(last.split("=")[1])
    output = job_output(console, lines=wanted)
    assert len(output.splitlines()) <= wanted


@given(st.binary(max_size=600), st.binary(max_size=600), st.integers(1, 700))
def test_the_console_tail_is_bounded(rotated: bytes, current: bytes, max_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        job_dir = Path(directory)
        (job_dir / f"{CONSOLE_LOG}.0").write_bytes(rotated)
        (job_dir / CONSOLE_LOG).write_bytes(current)
        tail = console_tail(job_dir, max_bytes)
    whole = rotated + current
    assert len(tail) <= max_bytes  # each character read came from at least one byte
    if len(whole) < max_bytes:
        assert tail == whole.decode(errors="replace")
