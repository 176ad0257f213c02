"""Who holds what on a host, as the claim store sees it under its lock: the conflict
check that every claim is made on (`sandfleet.workers.gpu.claims`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# One chosen device: (claimed id, the driver's name for it, its physical GPU's UUID).
Pick = tuple[str, str, str]


@dataclass(frozen=True)
class Holdings:
    """Who holds what, for the conflict check made under the lock."""

    by_id: dict[str, str]  # claimed id (GPU or MIG UUID) -> job id
    by_gpu: dict[str, str]  # physical GPU -> a job holding it whole or a part of it
    # GPU (or instance) UUID -> why no new claim may take it: drained, unhealthy
    # (`GpuStates.unavailable`). A GPU's state covers its MIG instances too.
    unavailable: dict[str, str] = field(default_factory=dict)

    def holder(self, claimable: str, parent: str) -> str | None:
        """The job whose claim conflicts with claiming `claimable` on GPU `parent`: for
        a whole GPU (`claimable == parent`) any claim on it or on one of its instances;
        for a MIG instance, a claim on that instance or on the whole GPU."""
        if claimable == parent:
            return self.by_gpu.get(parent)
        return self.by_id.get(claimable) or self.by_id.get(parent)

    def out_of_service(self, claimable: str, parent: str) -> str | None:
        """Why no claim may take `claimable` (on GPU `parent`) now, if none may."""
        return self.unavailable.get(claimable) or self.unavailable.get(parent)

    def takeable(self, claimable: str, parent: str) -> bool:
        return self.holder(claimable, parent) is None and not self.out_of_service(claimable, parent)
