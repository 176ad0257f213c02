"""The VM driver's host files: which boot files a job may use, and the job's own files
(private, never written through a planted link, the console read from its tail)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandfleet.workers.drivers.vm.image_files import (
    DISK_FIELD,
    INITRD_FIELD,
    KERNEL_FIELD,
    ImagePolicy,
    ImageRefused,
    check_image,
    read_image,
)
from sandfleet.workers.drivers.vm.job_files import (
    CONSOLE_LOG,
    console_tail,
    make_private_dir,
    started_at,
    write_private,
)

SECRET = b"BROKER_PASSWORD=hunter2\n"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def policy(*dirs: Path, cap: int = 1024) -> ImagePolicy:
    return ImagePolicy(dirs=dirs, kernel_max_bytes=cap, initrd_max_bytes=cap, disk_max_bytes=cap)


def refusal(images: Path, field: str, path: Path | str, *, cap: int = 1024) -> str:
    with pytest.raises(ImageRefused) as refused:
        read_image(policy(images, cap=cap), field, str(path))
    assert refused.value.field == field
    assert SECRET.decode().strip() not in str(refused.value)
    return str(refused.value)


def test_a_file_inside_the_image_dirs_is_read(images: Path) -> None:
    (images / "initrd.img").write_bytes(b"cpio")
    (images / "current").symlink_to(images / "initrd.img")  # links within are fine
    assert read_image(policy(images), INITRD_FIELD, str(images / "current")) == b"cpio"
    assert check_image(policy(images), KERNEL_FIELD, str(images / "current")) == (
        images / "initrd.img"
    )


def test_a_symlink_out_of_the_image_dirs_is_refused(images: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    (images / "initrd.img").symlink_to(tmp_path / "secret")
    message = refusal(images, INITRD_FIELD, images / "initrd.img")
    assert message.startswith(f"{INITRD_FIELD}: {images}/initrd.img resolves outside")


def test_a_symlinked_image_dir_is_followed_to_its_real_place(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    images = policy(tmp_path / "linked")
    assert check_image(images, KERNEL_FIELD, str(tmp_path / "linked" / "vmlinuz")) == (
        tmp_path / "real" / "vmlinuz"
    )


def test_proc_files_are_refused_even_inside_an_image_dir() -> None:
    """/proc/self/environ would hand the guest the worker's environment (its broker
    password). (/proc/kcore, which says it is huge, meets the size cap.)"""
    proc = Path("/proc")
    assert "is empty" in refusal(proc, INITRD_FIELD, "/proc/self/environ")
    assert "is not a regular file" in refusal(proc, INITRD_FIELD, "/proc/self")


def test_devices_fifos_and_dirs_are_refused(images: Path) -> None:
    os.mkfifo(images / "fifo")  # opened (without O_NONBLOCK), it would block the worker
    (images / "dir").mkdir()
    for name in ("fifo", "dir"):
        assert refusal(images, DISK_FIELD, images / name).endswith("is not a regular file")
    assert refusal(Path("/dev"), DISK_FIELD, "/dev/zero").endswith("is not a regular file")


def test_sizes_are_capped_and_missing_files_named(images: Path) -> None:
    (images / "big").write_bytes(b"x" * 1025)
    assert refusal(images, INITRD_FIELD, images / "big").endswith(
        "is 1025 bytes; the cap for it is 1024"
    )
    assert refusal(images, KERNEL_FIELD, images / "nope").endswith("is not a file on this host")


def test_the_private_job_dir_and_its_files(tmp_path: Path) -> None:
    job_dir = tmp_path / "work" / "sandfleet-j1"
    make_private_dir(job_dir, hypervisor_group=None)
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    write_private(job_dir / "initrd.img", SECRET)
    assert stat.S_IMODE((job_dir / "initrd.img").stat().st_mode) == 0o600

    make_private_dir(job_dir, hypervisor_group=f"+{os.getgid()}")  # an earlier one goes
    assert not (job_dir / "initrd.img").exists()
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o710
    assert job_dir.stat().st_gid == os.getgid()


def test_writes_never_follow_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    (tmp_path / "initrd.img").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "initrd.img", SECRET)
    assert target.read_bytes() == b"untouched"


def test_the_console_is_read_from_its_tail_across_virtlogds_rotation(tmp_path: Path) -> None:
    (tmp_path / f"{CONSOLE_LOG}.0").write_bytes(b"old\n" * 1000 + b"SANDFLEET_EX")
    (tmp_path / CONSOLE_LOG).write_bytes(b"IT=3\r\nreboot: Power down\r\n")
    tail = console_tail(tmp_path, 100)
    assert len(tail.encode()) <= 100
    assert tail.endswith("old\nSANDFLEET_EXIT=3\r\nreboot: Power down\r\n")
    assert not tail.startswith(("ld", "d", "\n"))  # from a whole line
    assert console_tail(tmp_path / "none", 100) == ""


def test_a_linked_console_or_start_record_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / CONSOLE_LOG).symlink_to(tmp_path / "secret")
    (tmp_path / "started_at").symlink_to(tmp_path / "secret")
    assert console_tail(tmp_path, 100) == ""
    assert started_at(tmp_path) == (False, None)


def test_a_garbled_start_record_means_started_at_an_unknown_time(tmp_path: Path) -> None:
    (tmp_path / "started_at").write_bytes(b"\xff" * 10_000)
    assert started_at(tmp_path) == (True, None)
