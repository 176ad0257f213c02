"""Host-local GPU claims, shared by every sandfleet worker process on the host.

A claim maps one job of one driver to the physical GPUs (by UUID) it holds, so a CDI
name and a PCI address of the same GPU conflict whichever driver asked. A claim may hold
MIG instances (by MIG UUID) instead: a whole GPU conflicts with each of its instances and
they with it; two instances of one GPU do not (`Holdings`). A claim is
known by its driver and job id together: one id may reach both Docker and Podman on one
host (a resubmission), whose workers share this store, and a job of one driver must
never find, take, adopt or release the other's claim. All state sits in one JSON file
under `<state_dir>/gpu/`; every read-modify-write happens under an exclusive `flock`
on a lock file beside it: a kernel lock, held by an open file description, released by
the kernel when its holder dies, and never inherited by child processes (Python opens
descriptors non-inheritable).

Each worker also holds a lease (`<state_dir>/workers/<worker_id>.lock`, flocked for
its lifetime). A claim whose worker's lease is free belongs to a dead worker; it is
released once its sandbox is gone (`reconcile`), and kept while the sandbox runs.

Both directories are 0700 and their files 0600, opened, read and written as
`sandfleet.workers.state_files` says: never through a link planted in their place.

The file's `version`: 1 keyed claims by job id; 2 lists them; 3 is written once any
record names `parents` (a MIG claim), which a version-2 worker cannot read. Every
version is read. Upgrade all the workers on a host together: an older one does not
know what newer records mean (`sandfleet.workers.gpu.claim_record`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from sandfleet.workers.gpu.claim_record import (
    UNKNOWN_DRIVER,
    Claim,
    ClaimKey,
    GpuBusy,
    GpuUnavailable,
    NotEnoughGpus,
    holdings_of,
)
from sandfleet.workers.gpu.health import GpuStates
from sandfleet.workers.gpu.holdings import Holdings, Pick
from sandfleet.workers.state_files import open_private, private_dir, read_private, write_private


@dataclass
class _Document:
    """The store's file: the claims, and the GPUs' drain and health states."""

    claims: dict[ClaimKey, Claim]
    states: GpuStates


def _open_locked(path: Path, *, blocking: bool = True) -> int | None:
    """An fd of `path` holding an exclusive flock, or None if not blocking and it is held."""
    fd = open_private(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class WorkerLease:
    """Held (flocked) by a worker process for its lifetime; its liveness signal."""

    def __init__(self, state_dir: Path, worker_id: str) -> None:
        self._path = state_dir / "workers" / f"{worker_id}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        private_dir(self._path.parent)
        self._fd = _open_locked(self._path, blocking=False)
        if self._fd is None:
            raise RuntimeError(f"worker lease {self._path} is held by another process")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            os.close(self._fd)
            self._fd = None


def worker_alive(state_dir: Path, worker_id: str) -> bool:
    path = state_dir / "workers" / f"{worker_id}.lock"
    if not path.exists():
        return False
    fd = _open_locked(path, blocking=False)
    if fd is None:
        return True
    os.close(fd)  # nobody held it: its worker is gone
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return False


class GpuClaimStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._dir = state_dir / "gpu"
        self._lock_path = self._dir / "claims.lock"
        self._data_path = self._dir / "claims.json"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[ClaimKey, Claim]]:
        """The claims, read under the lock; written back if the block changed them."""
        with self._document() as document:
            yield document.claims

    @contextlib.contextmanager
    def _document(self) -> Iterator[_Document]:
        """The whole file, read under the lock; written back if the block changed it."""
        private_dir(self._dir)
        fd = _open_locked(self._lock_path)
        assert fd is not None
        try:
            document = self._read()
            claims, states = dict(document.claims), document.states
            yield document
            if document.claims != claims or document.states != states:
                self._write(document)
        finally:
            os.close(fd)  # closing the last fd of the open file description unlocks

    def _read(self) -> _Document:
        try:
            raw = json.loads(read_private(self._data_path))
        except FileNotFoundError:
            return _Document({}, GpuStates())
        records = raw["claims"]
        if isinstance(records, dict):  # the layout before version 2: keyed by job id
            records = [{"job_id": job_id, **data} for job_id, data in records.items()]
        claims = (Claim.from_dict(data) for data in records)
        # No `gpu_states` (a file from before drains): every GPU healthy and undrained.
        states = GpuStates.from_json(raw.get("gpu_states"))
        return _Document({claim.key: claim for claim in claims}, states)

    def _write(self, document: _Document) -> None:
        # Write-then-rename: a crash leaves the old file or the new one, never half of one.
        records = [claim.as_record() for claim in document.claims.values()]
        # Left by a writer killed mid-write: none is under way, as writes hold the lock.
        for stale in self._dir.glob(f"{self._data_path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        version = 3 if any("parents" in record for record in records) else 2
        raw = {"version": version, "claims": records, "gpu_states": document.states.to_json()}
        write_private(self._data_path, json.dumps(raw).encode())

    def claims(self) -> list[Claim]:
        with self._transaction() as claims:
            return sorted(claims.values(), key=lambda c: c.claimed_at)

    def claim(
        self,
        *,
        job_id: str,
        gpus: Sequence[str],
        devices: Sequence[str],
        driver: str,
        worker_id: str,
        parents: Sequence[str] | None = None,
    ) -> Claim:
        """Claim exactly these GPUs (UUIDs; MIG UUIDs with their GPUs as `parents`) for
        `job_id`, all or none."""
        physical = list(parents or gpus)

        def choose(held: Holdings) -> list[Pick]:
            pairs = list(zip(gpus, physical, strict=True))
            if out := {g: why for g, p in pairs if (why := held.out_of_service(g, p))}:
                raise GpuUnavailable(out)
            holders = {g: held.holder(g, p) for g, p in pairs}
            busy = {gpu: job for gpu, job in holders.items() if job is not None}
            if busy:
                raise GpuBusy(busy)
            return list(zip(gpus, devices, physical, strict=True))

        return self._claim(job_id, driver, worker_id, choose)

    def claim_any(
        self,
        *,
        job_id: str,
        count: int,
        candidates: Sequence[str],
        device_for: Callable[[str], str],
        driver: str,
        worker_id: str,
    ) -> Claim:
        """Claim any `count` free GPUs among `candidates` (UUIDs, in preference order)."""

        def choose(held: Holdings) -> list[Pick]:
            free = [gpu for gpu in candidates if held.takeable(gpu, gpu)]
            if len(free) < count:
                busy = {gpu: held.by_gpu[gpu] for gpu in candidates if gpu in held.by_gpu}
                out = {gpu: held.unavailable[gpu] for gpu in candidates if gpu in held.unavailable}
                raise NotEnoughGpus(count, len(free), busy, out)
            return [(gpu, device_for(gpu), gpu) for gpu in free[:count]]

        return self._claim(job_id, driver, worker_id, choose)

    def claim_chosen(
        self, *, job_id: str, driver: str, worker_id: str, choose: Callable[[Holdings], list[Pick]]
    ) -> Claim:
        """Claim what `choose` picks, given who holds what; it runs under the lock, so its
        choice is made on the claims as they are (and raises to claim nothing)."""
        return self._claim(job_id, driver, worker_id, choose)

    def _claim(
        self,
        job_id: str,
        driver: str,
        worker_id: str,
        choose: Callable[[Holdings], list[Pick]],
    ) -> Claim:
        """One atomic claim: `choose` picks (id, device, GPU) given the holdings, which
        say who holds what and which GPUs no claim may take (drained, unhealthy).

        A job that already holds a claim (a redelivery) gets it back, now owned by
        `worker_id`.
        """
        key = (driver, job_id)
        with self._document() as document:
            claims = document.claims
            existing = claims.get(key)
            if existing is not None:
                claims[key] = replace(existing, worker_id=worker_id)
                return claims[key]
            chosen = choose(holdings_of(claims.values(), document.states.unavailable()))
            ids = tuple(gpu for gpu, _, _ in chosen)
            parents = tuple(parent for _, _, parent in chosen)
            claims[key] = Claim(
                job_id=job_id,
                driver=driver,
                worker_id=worker_id,
                gpus=ids,
                devices=tuple(device for _, device, _ in chosen),
                sandbox_id=None,
                claimed_at=datetime.now(UTC).isoformat(),
                parents=() if parents == ids else parents,
            )
            return claims[key]

    def adopt(self, job_id: str, *, driver: str, worker_id: str) -> Claim | None:
        """`driver`'s claim for `job_id`, now owned by `worker_id`; None if it has none."""
        with self._transaction() as claims:
            key = (driver, job_id)
            if key not in claims:
                return None
            claims[key] = replace(claims[key], worker_id=worker_id)
            return claims[key]

    def attach_sandbox(self, job_id: str, sandbox_id: str, *, driver: str) -> None:
        with self._transaction() as claims:
            key = (driver, job_id)
            if key in claims:
                claims[key] = replace(claims[key], sandbox_id=sandbox_id)

    def release(self, job_id: str, *, driver: str) -> Claim | None:
        with self._transaction() as claims:
            return claims.pop((driver, job_id), None)

    def free(self, candidates: Collection[str]) -> list[str]:
        """The whole GPUs among `candidates` (UUIDs) a claim could take now: held by
        no claim, whole or in part, and neither drained nor unhealthy."""
        with self._document() as document:
            held = holdings_of(document.claims.values(), document.states.unavailable())
            return [gpu for gpu in candidates if held.takeable(gpu, gpu)]

    # ---- drain and health (sandfleet.workers.gpu.health): changed under the claims' lock

    def states(self) -> GpuStates:
        with self._document() as document:
            return document.states

    def unavailable(self) -> dict[str, str]:
        """GPU UUID -> why no new claim may take it."""
        return self.states().unavailable()

    def drain(self, uuid: str, *, reason: str, by: str) -> GpuStates:
        """No claim that commits from now on takes `uuid`; claims made already stay."""
        return self._change_states(lambda states: states.drain(uuid, reason, by))

    def undrain(self, uuid: str) -> GpuStates:
        return self._change_states(lambda states: states.undrain(uuid))

    def mark_unhealthy(self, uuid: str, reason: str) -> GpuStates:
        """Idempotent: a GPU stays unhealthy since its first mark, until `mark_healthy`."""
        return self._change_states(lambda states: states.mark_unhealthy(uuid, reason))

    def mark_healthy(self, uuid: str) -> GpuStates:
        return self._change_states(lambda states: states.mark_healthy(uuid))

    def _change_states(self, change: Callable[[GpuStates], GpuStates]) -> GpuStates:
        """The states after `change`, written if it changed them."""
        with self._document() as document:
            document.states = change(document.states)
            return document.states

    def reconcile(self, *, driver: str, live_jobs: Collection[str]) -> list[Claim]:
        """Release `driver`'s claims whose worker is dead and whose job is over.

        Claims of live workers are theirs to release; a dead worker's claim stays
        while its job is in `live_jobs` (the caller's word: a sandbox still running,
        or a job not yet finished by whoever takes it over).
        """
        with self._transaction() as claims:
            released = [
                claim
                for claim in claims.values()
                if claim.driver == driver
                and claim.job_id not in live_jobs
                and not worker_alive(self.state_dir, claim.worker_id)
            ]
            for claim in released:
                del claims[claim.key]
            return released


__all__ = [
    "UNKNOWN_DRIVER",
    "Claim",
    "ClaimKey",
    "GpuBusy",
    "GpuClaimStore",
    "GpuUnavailable",
    "NotEnoughGpus",
    "WorkerLease",
    "worker_alive",
]
