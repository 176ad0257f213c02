"""One claim as the claim store keeps it (`sandfleet.workers.gpu.claims`), the holdings
the store's claims add up to, and the errors a claim can meet.

A record is read forward-compatibly: keys this version does not know are ignored, so a
newer worker's record does not break this one's reading of the file. What those keys
meant is lost on such a reader all the same (this version knows `parents`; one before
it did not): upgrade every worker on a host together.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Any

from sandfleet.workers.gpu.holdings import Holdings

ClaimKey = tuple[str, str]  # (driver, job id)

# The driver of a record that names none. Every version has written the driver into
# each record; one without it was edited by hand: its GPUs stay held, and no driver's
# job finds, adopts or releases it (remove it by hand).
UNKNOWN_DRIVER = "?"


@dataclass(frozen=True, kw_only=True)
class Claim:
    job_id: str
    driver: str
    worker_id: str
    gpus: tuple[str, ...]  # claimed identities: GPU UUIDs, or MIG instance UUIDs
    devices: tuple[str, ...]  # the same GPUs as the driver names them
    sandbox_id: str | None
    claimed_at: str  # ISO 8601, UTC
    # Each claimed id's physical GPU, where one is a MIG instance; () when all are whole
    # GPUs (every record before MIG; left out of the file then, so it reads as before).
    parents: tuple[str, ...] = ()

    @property
    def key(self) -> ClaimKey:
        return (self.driver, self.job_id)

    @property
    def holds(self) -> tuple[tuple[str, str], ...]:
        """(claimed id, its physical GPU) for each thing this claim keeps from others."""
        if not self.parents:
            return tuple((gpu, gpu) for gpu in self.gpus)
        if len(self.parents) == len(self.gpus):
            return tuple(zip(self.gpus, self.parents, strict=True))
        # Lists of different lengths (a record edited or damaged by hand): which id is on
        # which GPU is unknown, so every id and every parent is held as a whole GPU (all
        # of its instances with it). Holding too much is safe; too little is not.
        return tuple((i, i) for i in dict.fromkeys((*self.gpus, *self.parents)))

    @property
    def physical(self) -> tuple[str, ...]:
        """The physical GPU (UUID) behind each claimed id."""
        return tuple(parent for _, parent in self.holds)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Claim:
        """A record as read; keys a newer version added are ignored (see above)."""
        known = {f.name for f in fields(cls)}
        values = {"driver": UNKNOWN_DRIVER, **{k: v for k, v in data.items() if k in known}}
        listed = {key: tuple(data.get(key, ())) for key in ("gpus", "devices", "parents")}
        return cls(**{**values, **listed})

    def as_record(self) -> dict[str, Any]:
        record = asdict(self)
        if not self.parents:
            del record["parents"]
        return record


def holdings_of(claims: Collection[Claim], unavailable: dict[str, str] | None = None) -> Holdings:
    by_id, by_gpu = {}, {}
    for claim in claims:
        for gpu, parent in claim.holds:
            by_id[gpu] = by_gpu[parent] = claim.job_id
    return Holdings(by_id, by_gpu, unavailable or {})


class GpuBusy(Exception):
    def __init__(self, holders: dict[str, str]) -> None:
        self.holders = holders  # GPU UUID -> job id holding it
        super().__init__(", ".join(f"{gpu} held by job {job}" for gpu, job in holders.items()))


class GpuUnavailable(Exception):
    """Asked-for GPUs that no claim may take now: drained, or marked unhealthy."""

    def __init__(self, unavailable: dict[str, str]) -> None:
        self.unavailable = unavailable  # GPU UUID -> why (`GpuStates.unavailable`)
        super().__init__(", ".join(f"{gpu} {why}" for gpu, why in unavailable.items()))


class NotEnoughGpus(Exception):
    """`what`: what was wanted, as the message names it ("GPU(s)", or MIG instances)."""

    def __init__(
        self,
        wanted: int,
        free: int,
        holders: dict[str, str],
        unavailable: dict[str, str] | None = None,
        *,
        what: str = "GPU(s)",
    ) -> None:
        self.wanted, self.free, self.holders = wanted, free, holders
        self.unavailable = unavailable or {}
        held = [f"{gpu} held by job {job}" for gpu, job in holders.items()]
        held += [f"{gpu} {why}" for gpu, why in self.unavailable.items()]
        super().__init__(f"{wanted} {what} wanted, {free} free ({', '.join(held)})")
