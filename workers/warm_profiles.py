"""Warm pool profiles: what a worker keeps ready, as `--warm IMAGE=N` or
SANDFLEET_WARM_POOLS (a JSON list of `{"image", "count", "cpu", "memory",
"driver_config"}`) say. Pure parsing: no driver, no runtime.

A profile is matched by a job's image, resources and driver block exactly, so a job
taking one of its sandboxes runs in what it would have been given cold.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from sandfleet.common.errors import SandfleetError
from sandfleet.common.models import CpuCores, MemoryBytes

MAX_WARM_PER_PROFILE = 64
MAX_PROFILES = 16
MAX_WARM_IN_ALL = 256  # what one worker keeps ready, all profiles together
SETTING = "SANDFLEET_WARM_POOLS"
OPTION = "--warm"


class PoolProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    count: Annotated[int, Field(ge=1, le=MAX_WARM_PER_PROFILE)]
    cpu: CpuCores | None = None
    memory: MemoryBytes | None = None
    # The job's driver block must equal this one, parsed (for VMs: the rest of the vm
    # block, e.g. its initrd); empty matches jobs that give none (or only defaults).
    driver_config: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """The profile's name on its sandboxes (LABEL_POOL): the same profile on any
        worker gets the same key, so a successor knows a dead worker's pools."""
        shape = {
            "image": self.image,
            "cpu": self.cpu,
            "memory": self.memory,
            "driver_config": self.driver_config,
        }
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
        return digest[:16]


class WarmPoolsInvalid(SandfleetError):
    """A warm pool setting that cannot be used; the message names each field."""


def warm_profiles(setting: str, options: list[str]) -> list[PoolProfile]:
    """The profiles of SANDFLEET_WARM_POOLS (`setting`, JSON) and then `--warm` (`options`)."""
    profiles = _from_setting(setting) + [_from_option(option) for option in options]
    keys = [profile.key for profile in profiles]
    duplicated = sorted({p.image for p in profiles if keys.count(p.key) > 1})
    if duplicated:
        raise WarmPoolsInvalid(
            f"{SETTING}/{OPTION}: more than one profile for the same image and resources "
            f"({', '.join(duplicated)}); give one profile with the whole count"
        )
    if len(profiles) > MAX_PROFILES:
        raise WarmPoolsInvalid(f"{SETTING}/{OPTION}: at most {MAX_PROFILES} profiles")
    total = sum(profile.count for profile in profiles)
    if total > MAX_WARM_IN_ALL:
        raise WarmPoolsInvalid(
            f"{SETTING}/{OPTION}: {total} warm sandboxes in all; at most {MAX_WARM_IN_ALL}"
        )
    return profiles


def _from_setting(setting: str) -> list[PoolProfile]:
    if not setting.strip():
        return []
    try:
        entries = json.loads(setting)
    except ValueError as exc:
        raise WarmPoolsInvalid(f"{SETTING}: not JSON ({exc})") from None
    if not isinstance(entries, list):
        raise WarmPoolsInvalid(f"{SETTING}: must be a JSON list of profiles")
    profiles, errors = [], []
    for index, entry in enumerate(entries):
        try:
            profiles.append(PoolProfile.model_validate(entry))
        except ValidationError as exc:
            errors += [_named(f"{SETTING}[{index}]", error) for error in exc.errors()]
    if errors:
        raise WarmPoolsInvalid("; ".join(errors[:20]))
    return profiles


def _from_option(option: str) -> PoolProfile:
    image, sep, count = option.rpartition("=")
    if not sep or not image or not count.isdigit() or len(count) > 4:
        raise WarmPoolsInvalid(f"{OPTION} {option!r}: give IMAGE=COUNT, e.g. busybox:latest=4")
    try:
        return PoolProfile(image=image, count=int(count))
    except ValidationError as exc:
        raise WarmPoolsInvalid(
            "; ".join(_named(f"{OPTION} {option!r}", error) for error in exc.errors())
        ) from None


def _named(where: str, error: Any) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
    return f"{where}{path}: {error['msg']}"
