"""Podman through the libpod API. PodmanApiError never leaves this module."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from sandfleet.common.errors import ImageUnavailable, SandboxError, SandboxNameTaken
from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import (
    LABEL_DRIVER,
    SandboxSpec,
    SandboxState,
    SandboxStatus,
    WarmSpec,
)
from sandfleet.workers.drivers.cdi import ContainerBlock, checked_image, parse_container_block
from sandfleet.workers.drivers.container_settings import ContainerLimits
from sandfleet.workers.drivers.container_state import state_from_inspect
from sandfleet.workers.drivers.errors import error_translator
from sandfleet.workers.drivers.podman.attached_stdin import PodmanStdin
from sandfleet.workers.drivers.podman.client import (
    FrameReader,
    LibpodClient,
    PodmanApiError,
    demultiplex,
)
from sandfleet.workers.drivers.podman.spec import spec_generator, warm_spec_generator
from sandfleet.workers.drivers.warm_containers import (
    ImageDefaults,
    Waiting,
    WaitingContainers,
    as_sandbox_spec,
)
from sandfleet.workers.gpu.inventory import DEFAULT_CDI_KIND, Gpu, MigDevice

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
        self,
        *,
        url: str,
        cdi_kind: str = DEFAULT_CDI_KIND,
        pull_timeout_seconds: float = 300.0,
        create_timeout_seconds: float = 60.0,
        limits: ContainerLimits | None = None,
    ) -> None:
        self._api = LibpodClient(url)
        self._cdi_kind = cdi_kind
        self._pull_timeout = pull_timeout_seconds
        self._create_timeout = create_timeout_seconds
        self._limits = limits or ContainerLimits()
        self._waiting = WaitingContainers("podman")
        self._images: dict[str, ImageDefaults] = {}  # by image id

    async def aclose(self) -> None:
        await self._waiting.aclose()
        await self._api.aclose()

    def parse_config(self, job: Job) -> ContainerBlock:
        return parse_container_block(job, self._limits)

    def device_id(self, gpu: Gpu) -> str:
        return f"{self._cdi_kind}={gpu.index}"

    def mig_device_id(self, mig: MigDevice) -> str:
        """A MIG instance by its CDI name, as nvidia-ctk names it (`…=0:1`)."""
        return f"{self._cdi_kind}={mig.cdi_name}"

    async def _ensure_image(self, image: str) -> None:
        """The image, pulled if missing, within the pull timeout: the look-up too, so
        no answer of the service's can hold a job (and its GPUs) beyond it."""
        try:
            async with asyncio.timeout(self._pull_timeout):
                if await self._has_image(image):
                    return
                body = await self._api.request(
                    "POST", "images", "pull", params={"reference": image, "quiet": "true"}
                )
        except (PodmanApiError, TimeoutError) as exc:
            detail = exc.message if isinstance(exc, PodmanApiError) else self._pull_timed_out
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

    @property
    def _pull_timed_out(self) -> str:
        return f"timed out after {self._pull_timeout:g}s (SANDFLEET_IMAGE_PULL_TIMEOUT_SECONDS)"

    async def _has_image(self, image: str) -> bool:
        try:
            await self._api.request("GET", "images", image, "exists")
        except PodmanApiError as exc:
            if exc.status == 404:
                return False
            raise SandboxError(f"podman image exists {image}: {exc.message}") from exc
        return True

    async def create(self, spec: SandboxSpec[ContainerBlock]) -> SandboxState:
        await self._ensure_image(checked_image(spec.image))
        container_id = await self._create_container(spec_generator(spec, self._limits))
        state = await self.find(container_id)
        if state is None:
            raise SandboxError(f"podman create {spec.name}: the container vanished after creation")
        return state

    async def _create_container(self, body: dict[str, Any]) -> str:
        name = body["name"]
        try:
            async with asyncio.timeout(self._create_timeout):
                created = await self._api.json("POST", "containers", "create", body=body)
        except PodmanApiError as exc:
            error = SandboxNameTaken if exc.name_in_use else SandboxError
            raise error(f"podman create {name}: {exc.message}") from exc
        except TimeoutError as exc:
            message = (
                f"podman create {name}: no answer in {self._create_timeout:g}s "
                "(SANDFLEET_CONTAINER_CREATE_TIMEOUT_SECONDS)"
            )
            raise SandboxError(message) from exc
        return str(created["Id"])

    async def create_warm(self, spec: WarmSpec[ContainerBlock]) -> SandboxState:
        await self._ensure_image(checked_image(spec.image))
        body = warm_spec_generator(as_sandbox_spec(spec), self._limits)
        container_id = await self._create_container(body)
        stdin: PodmanStdin | None = None
        try:
            stdin = await self._attached(container_id)
            await self.start(container_id)
            info = await self._inspect(container_id)
            image = await self._image_defaults(str(info["Image"]))
        except BaseException:
            await self._discard(container_id, stdin)
            raise
        state = state_from_inspect(info)
        if state.status is not SandboxStatus.RUNNING:
            await self._discard(container_id, stdin)
            raise SandboxError(f"podman start {spec.name}: the warm container exited at once")
        self._waiting.hold(container_id, Waiting(stdin=stdin, image=image, labels=state.labels))
        return state

    async def _attached(self, container_id: str) -> PodmanStdin:
        async with _translated("attach", container_id):
            return await PodmanStdin.attach(self._api, container_id)

    async def _discard(self, container_id: str, stdin: PodmanStdin | None) -> None:
        if stdin is not None:
            await stdin.aclose()
        await self.remove(container_id)

    async def _inspect(self, container_id: str) -> dict[str, Any]:
        async with _translated("inspect", container_id):
            info: dict[str, Any] = await self._api.json("GET", "containers", container_id, "json")
        return info

    async def _image_defaults(self, image_id: str) -> ImageDefaults:
        """An image's Entrypoint and Cmd, asked once per image id (an id names one
        image for ever, where a tag can move)."""
        if image_id not in self._images:
            async with _translated("image inspect", image_id):
                info = await self._api.json("GET", "images", image_id, "json")
            self._images[image_id] = ImageDefaults.from_config(info.get("Config"))
        return self._images[image_id]

    async def take_warm(self, sandbox_id: str, spec: SandboxSpec[ContainerBlock]) -> SandboxState:
        return await self._waiting.take(sandbox_id, spec, self._rename, self.find)

    async def _rename(self, sandbox_id: str, name: str) -> None:
        try:
            await self._api.request(
                "POST", "containers", sandbox_id, "rename", params={"name": name}
            )
        except PodmanApiError as exc:
            error = SandboxNameTaken if exc.name_in_use else SandboxError
            raise error(f"podman rename {sandbox_id} {name}: {exc.message}") from exc

    async def start(self, sandbox_id: str) -> None:
        async with _translated("start", sandbox_id):
            await self._api.request("POST", "containers", sandbox_id, "start")

    async def wait(self, sandbox_id: str) -> int:
        async with _translated("wait", sandbox_id):
            code = await self._api.json(
                "POST", "containers", sandbox_id, "wait", params={"condition": "exited"}
            )
        return int(code)

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None:
        async with _translated("stop", sandbox_id):
            await self._api.request(
                "POST",
                "containers",
                sandbox_id,
                "stop",
                params={"timeout": str(int(grace_seconds))},
            )

    async def remove(self, sandbox_id: str) -> None:
        await self._waiting.drop(sandbox_id)
        try:
            await self._api.request(
                "DELETE", "containers", sandbox_id, params={"force": "true", "v": "true"}
            )
        except PodmanApiError as exc:
            if not exc.no_such_container:
                raise SandboxError(f"podman rm {sandbox_id}: {exc.message}") from exc

    async def find(self, name: str) -> SandboxState | None:
        try:
            info = await self._api.json("GET", "containers", name, "json")
        except PodmanApiError as exc:
            if exc.no_such_container:
                return None
            raise SandboxError(f"podman inspect {name}: {exc.message}") from exc
        return state_from_inspect(info)

    async def list_sandboxes(self) -> list[SandboxState]:
        filters = json.dumps({"label": [f"{LABEL_DRIVER}={self.name}"]})
        async with _translated("ps", "sandfleet containers"):
            listed = await self._api.json(
                "GET", "containers", "json", params={"all": "true", "filters": filters}
            )
        states = [await self.find(item["Id"]) for item in listed or []]
        return [s for s in states if s is not None]

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        async with _translated("logs", sandbox_id):
            raw = await self._api.request(
                "GET",
                "containers",
                sandbox_id,
                "logs",
                params={"stdout": "true", "stderr": "true", "tail": str(lines)},
            )
        return demultiplex(raw)

    async def follow_output(self, sandbox_id: str) -> AsyncIterator[bytes]:
        # libpod's logs API with follow: from the start, then live, ending with the
        # container; docker-style frames, cut anywhere by the transport.
        frames = FrameReader()
        params = {"stdout": "true", "stderr": "true", "follow": "true"}
        async with _translated("logs", sandbox_id):
            async for chunk in self._api.stream(
                "GET", "containers", sandbox_id, "logs", params=params
            ):
                if payload := frames.feed(chunk):
                    yield payload
