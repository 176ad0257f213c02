"""Podman through the libpod API. PodmanApiError never leaves this module."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sandfleet.common.errors import ImageUnavailable, SandboxError, SandboxNameTaken
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import LABEL_DRIVER, SandboxSpec, SandboxState
from sandfleet.workers.drivers.cdi import ContainerBlock, parse_container_block
from sandfleet.workers.drivers.container_state import state_from_inspect
from sandfleet.workers.drivers.errors import error_translator
from sandfleet.workers.drivers.podman.client import LibpodClient, PodmanApiError, demultiplex
from sandfleet.workers.gpu.inventory import DEFAULT_CDI_KIND, Gpu

_CPU_PERIOD_US = 100_000


_translated = error_translator(
    "podman",
    PodmanApiError,
    lambda exc: exc.message,
)


class PodmanDriver:
    """libpod resolves CDI names itself (Podman >= 4.1); a name it cannot resolve fails
    the container's start with Podman's own reason."""

    name = "podman"

    def __init__(
        self, *, url: str, cdi_kind: str = DEFAULT_CDI_KIND, pull_timeout_seconds: float = 300.0
    ) -> None:
        self._api = LibpodClient(url)
        self._cdi_kind = cdi_kind
        self._pull_timeout = pull_timeout_seconds

    async def aclose(self) -> None:
        await self._api.aclose()

    def parse_config(self, job: Job) -> ContainerBlock:
        return parse_container_block(job)

    def device_id(self, gpu: Gpu) -> str:
        return f"{self._cdi_kind}={gpu.index}"

    async def _ensure_image(self, image: str) -> None:
        try:
            await self._api.request("GET", f"/images/{image}/exists")
            return
        except PodmanApiError as exc:
            if exc.status != 404:
                raise SandboxError(f"podman image exists {image}: {exc.message}") from exc
        try:
            async with asyncio.timeout(self._pull_timeout):
                body = await self._api.request(
                    "POST", "/images/pull", params={"reference": image, "quiet": "true"}
                )
        except (PodmanApiError, TimeoutError) as exc:
            detail = exc.message if isinstance(exc, PodmanApiError) else "timed out"
            raise ImageUnavailable(
                f"image {image!r} is not on this host and pulling it failed: {detail}"
            ) from exc
        errors = [
            line["error"]
            for line in map(json.loads, body.decode().splitlines())
            if isinstance(line, dict) and line.get("error")
        ]
        if errors:
            raise ImageUnavailable(
                f"image {image!r} is not on this host and pulling it failed: {errors[-1]}"
            )

    async def create(self, spec: SandboxSpec[ContainerBlock]) -> SandboxState:
        await self._ensure_image(spec.image)
        body: dict[str, Any] = {
            "name": spec.name,
            "image": spec.image,
            "env": dict(spec.environment),
            "labels": dict(spec.labels),
            "devices": [{"path": device} for device in spec.gpu_devices],
        }
        if spec.command:
            body["command"] = list(spec.command)
        limits: dict[str, Any] = {}
        if spec.cpu is not None:
            limits["cpu"] = {"quota": int(spec.cpu * _CPU_PERIOD_US), "period": _CPU_PERIOD_US}
        if spec.memory_bytes is not None:
            limits["memory"] = {"limit": spec.memory_bytes}
        if limits:
            body["resource_limits"] = limits
        try:
            created = await self._api.json("POST", "/containers/create", body=body)
        except PodmanApiError as exc:
            error = SandboxNameTaken if exc.name_in_use else SandboxError
            raise error(f"podman create {spec.name}: {exc.message}") from exc
        state = await self.find(created["Id"])
        if state is None:
            raise SandboxError(f"podman create {spec.name}: the container vanished after creation")
        return state

    async def start(self, sandbox_id: str) -> None:
        async with _translated("start", sandbox_id):
            await self._api.request("POST", f"/containers/{sandbox_id}/start")

    async def wait(self, sandbox_id: str) -> int:
        async with _translated("wait", sandbox_id):
            code = await self._api.json(
                "POST", f"/containers/{sandbox_id}/wait", params={"condition": "exited"}
            )
        return int(code)

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None:
        async with _translated("stop", sandbox_id):
            await self._api.request(
                "POST",
                f"/containers/{sandbox_id}/stop",
                params={"timeout": str(int(grace_seconds))},
            )

    async def remove(self, sandbox_id: str) -> None:
        try:
            await self._api.request(
                "DELETE", f"/containers/{sandbox_id}", params={"force": "true", "v": "true"}
            )
        except PodmanApiError as exc:
            if not exc.no_such_container:
                raise SandboxError(f"podman rm {sandbox_id}: {exc.message}") from exc

    async def find(self, name: str) -> SandboxState | None:
        try:
            info = await self._api.json("GET", f"/containers/{name}/json")
        except PodmanApiError as exc:
            if exc.no_such_container:
                return None
            raise SandboxError(f"podman inspect {name}: {exc.message}") from exc
        return state_from_inspect(info)

    async def list_sandboxes(self) -> list[SandboxState]:
        filters = json.dumps({"label": [f"{LABEL_DRIVER}={self.name}"]})
        async with _translated("ps", "sandfleet containers"):
            listed = await self._api.json(
                "GET", "/containers/json", params={"all": "true", "filters": filters}
            )
        states = [await self.find(item["Id"]) for item in listed or []]
        return [s for s in states if s is not None]

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        async with _translated("logs", sandbox_id):
            raw = await self._api.request(
                "GET",
                f"/containers/{sandbox_id}/logs",
                params={"stdout": "true", "stderr": "true", "tail": str(lines)},
            )
        return demultiplex(raw)
