"""Secrets at rest: every file a worker keeps on its host (journal entries, which hold
a job's environment; the GPU claim store; worker leases) is 0600 in a 0700 directory,
whatever the umask, and none is ever written or read through a planted link."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandfleet.common.models import Job
from sandfleet.workers.gpu.claims import GpuClaimStore, WorkerLease
from sandfleet.workers.journal import JobJournal, JournalEntry
from sandfleet.workers.state_files import UnsafeStatePath, private_dir

SECRET = b"the target of a planted link: must stay as it is\n"


def job(job_id: str) -> Job:
    template = {"image": "busybox", "command": ["true"], "environment": {"TOKEN": "s3cret"}}
    body = {"job_id": job_id, "driver": "docker", "template": template}
    return Job.model_validate_json(json.dumps(body))


def journal(tmp_path: Path) -> JobJournal:
    return JobJournal(tmp_path / "journal", "docker", alive=lambda worker: False)


def claim(store: GpuClaimStore, job_id: str = "a") -> None:
    store.claim(job_id=job_id, gpus=["GPU-0"], devices=["d0"], driver="docker", worker_id="w")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def modes_under(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): mode(path) for path in sorted(root.rglob("*"))}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask there is: no bit of a requested mode is taken away."""
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "target"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


@pytest.mark.usefixtures("open_umask")
def test_every_state_file_is_0600_in_a_0700_directory_whatever_the_umask(
    tmp_path: Path,
) -> None:
    entries = journal(tmp_path)
    entries.take(job("a"), "w")
    entries.write(entries.take(job("b"), "w").model_copy(update={"closed": True}))
    lease = WorkerLease(tmp_path / "state", "w")
    lease.acquire()
    try:
        claim(GpuClaimStore(tmp_path / "state"))
        made = modes_under(tmp_path / "journal") | modes_under(tmp_path / "state")
    finally:
        lease.release()
    assert made == {
        "docker": 0o700,
        "docker/.lock": 0o600,
        "docker/a.json": 0o600,
        "docker/closed": 0o700,
        "docker/closed/b.json": 0o600,
        "gpu": 0o700,
        "gpu/claims.json": 0o600,
        "gpu/claims.lock": 0o600,
        "workers": 0o700,
        "workers/w.lock": 0o600,
    }
    assert mode(tmp_path / "journal") == mode(tmp_path / "state") == 0o700  # made by sandfleet


def test_state_written_loose_by_an_older_version_is_made_private_on_start(
    tmp_path: Path,
) -> None:
    (tmp_path / "journal" / "docker" / "closed").mkdir(parents=True)
    (tmp_path / "journal" / "docker" / "a.json").write_text(journal_entry("a"))
    (tmp_path / "state" / "gpu").mkdir(parents=True)
    (tmp_path / "state" / "gpu" / "claims.json").write_text('{"claims": {}}')
    (tmp_path / "state" / "workers").mkdir()
    for path in [*(tmp_path / "journal").rglob("*"), *(tmp_path / "state").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    journal(tmp_path)
    GpuClaimStore(tmp_path / "state").claims()
    lease = WorkerLease(tmp_path / "state", "w")
    lease.acquire()
    lease.release()
    found = modes_under(tmp_path / "journal") | modes_under(tmp_path / "state")
    assert {path: m for path, m in found.items() if m not in (0o600, 0o700)} == {}
    assert found["docker/a.json"] == found["gpu/claims.json"] == 0o600


def journal_entry(job_id: str) -> str:
    return JournalEntry(job=job(job_id), owner="w").model_dump_json()


# ---- links planted where a state file goes ----


def test_a_link_at_the_old_predictable_temp_name_is_never_written_through(
    tmp_path: Path, target: Path
) -> None:
    entries = journal(tmp_path)
    (tmp_path / "journal" / "docker" / f"a.{os.getpid()}.tmp").symlink_to(target)
    (tmp_path / "state" / "gpu").mkdir(parents=True, mode=0o700)
    (tmp_path / "state" / "gpu" / "claims.tmp").symlink_to(target)
    entries.take(job("a"), "w")
    claim(GpuClaimStore(tmp_path / "state"))
    assert target.read_bytes() == SECRET
    assert entries.read("a") is not None


def test_a_link_in_place_of_a_journal_entry_is_refused_and_replaced_not_followed(
    tmp_path: Path, target: Path
) -> None:
    entries = journal(tmp_path)
    place = tmp_path / "journal" / "docker" / "a.json"
    place.symlink_to(target)
    with pytest.raises(UnsafeStatePath, match=re.escape(f"{place}: a symbolic link, refused")):
        entries.read("a")
    with pytest.raises(UnsafeStatePath):
        entries.take(job("a"), "w")
    assert entries.open_entries("w") == []  # skipped, not fatal to reading the others
    entries.write(JournalEntry(job=job("a"), owner="w"))
    assert not place.is_symlink() and mode(place) == 0o600  # the link itself was replaced
    assert target.read_bytes() == SECRET


def test_a_link_in_place_of_the_claim_store_is_refused_and_its_target_untouched(
    tmp_path: Path, target: Path
) -> None:
    (tmp_path / "gpu").mkdir(mode=0o700)
    (tmp_path / "gpu" / "claims.json").symlink_to(target)
    place = tmp_path / "gpu" / "claims.json"
    with pytest.raises(UnsafeStatePath, match=re.escape(f"{place}: a symbolic link, refused")):
        claim(GpuClaimStore(tmp_path))
    assert target.read_bytes() == SECRET


def test_a_link_in_place_of_a_lock_is_refused_and_nothing_is_made_where_it_points(
    tmp_path: Path,
) -> None:
    nowhere = tmp_path / "elsewhere-not-made"
    (tmp_path / "workers").mkdir(mode=0o700)
    (tmp_path / "workers" / "w.lock").symlink_to(nowhere)
    place = tmp_path / "workers" / "w.lock"
    with pytest.raises(UnsafeStatePath, match=re.escape(f"{place}: a symbolic link, refused")):
        WorkerLease(tmp_path, "w").acquire()
    assert not nowhere.exists()


def test_a_link_in_place_of_a_state_directory_is_refused(tmp_path: Path, target: Path) -> None:
    (tmp_path / "gpu").symlink_to(target.parent)
    with pytest.raises(UnsafeStatePath, match="gpu: "):
        GpuClaimStore(tmp_path).claims()
    assert [p.name for p in target.parent.iterdir()] == ["target"]
    assert mode(target.parent) == 0o777 & ~current_umask()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's needs root")
def test_a_state_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 4242, 4242)
    with pytest.raises(UnsafeStatePath, match="owned by uid 4242"):
        private_dir(theirs)
    assert mode(theirs) == 0o777 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
