"""Docker Engine API through aiodocker. DockerError never leaves this module."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from sandfleet.common.errors import (
    CapabilityMissing,
    ImageUnavailable,
    SandboxError,
    SandboxNameTaken,
)
from sandfleet.common.image_ref import url_path_segment
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
from sandfleet.workers.drivers.docker.attached_stdin import DockerStdin
from sandfleet.workers.drivers.docker.gpu_route import GpuRoute, GpuSupport, gpu_support
from sandfleet.workers.drivers.docker.log_entries import since_param, split_entries
from sandfleet.workers.drivers.docker.spec import container_config, warm_container_config
from sandfleet.workers.drivers.errors import error_translator
from sandfleet.workers.drivers.warm_containers import (
    ImageDefaults,
    Waiting,
    WaitingContainers,
    as_sandbox_spec,
)
from sandfleet.workers.gpu.inventory import DEFAULT_CDI_KIND, Gpu, MigDevice

# How long an engine's GPU route is trusted before it is asked again: dockerd can be
# restarted with CDI turned on (or off) under a running worker.
GPU_SUPPORT_TTL_SECONDS = 30.0


_translated = error_translator(
    "docker",
    DockerError,
    lambda exc: exc.message,
)


def _client(url: str) -> aiodocker.Docker:
    """An engine client whose connections are not capped: each warm container holds one
    (its stdin's attach) while it waits, and aiohttp's default cap of 100 would leave
    every other call waiting for ever once a worker keeps that many."""
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"), limit=0)
        return aiodocker.Docker(url="unix://localhost", connector=connector)
    return aiodocker.Docker(url=url)  # TCP (a remote engine): aiodocker's own connector


class DockerDriver:
    name = "docker"

    def __init__(
        self,
        *,
        url: str,
        cdi_kind: str = DEFAULT_CDI_KIND,
        pull_timeout_seconds: float = 300.0,
        create_timeout_seconds: float = 60.0,
        limits: ContainerLimits | None = None,
    ) -> None:
        self._docker = _client(url)
        self._cdi_kind = cdi_kind
        self._pull_timeout = pull_timeout_seconds
        self._create_timeout = create_timeout_seconds
        self._limits = limits or ContainerLimits()
        self._gpu_support: tuple[float, GpuSupport] | None = None  # (asked at, answer)
        self._waiting = WaitingContainers("docker")
        self._images: dict[str, ImageDefaults] = {}  # by image id

    async def aclose(self) -> None:
        await self._waiting.aclose()
        await self._docker.close()
        await self._docker.connector.close()  # ours (for a socket), not the client's to close

    def parse_config(self, job: Job) -> ContainerBlock:
        return parse_container_block(job, self._limits)

    def device_id(self, gpu: Gpu) -> str:
        return f"{self._cdi_kind}={gpu.index}"

    def mig_device_id(self, mig: MigDevice) -> str:
        """A MIG instance by its CDI name, as nvidia-ctk names it (`…=0:1`)."""
        return f"{self._cdi_kind}={mig.cdi_name}"

    async def _gpu_route(self) -> GpuRoute:
        """This engine's way of taking GPUs (asked at most every GPU_SUPPORT_TTL_SECONDS);
        none: CapabilityMissing, saying what to enable."""
        now = time.monotonic()
        if self._gpu_support is None or now - self._gpu_support[0] > GPU_SUPPORT_TTL_SECONDS:
            async with _translated("version", "of the engine"):
                version = str((await self._docker.version()).get("Version", "0.0"))
                info = await self._docker.system.info()
            self._gpu_support = (now, gpu_support(version, info))
        support = self._gpu_support[1]
        if support.route is None:
            raise CapabilityMissing(support.detail)
        return support.route

    async def _ensure_image(self, image: str) -> None:
        """The image, pulled if missing, within the pull timeout: the look-up too, so
        no answer of the engine's can hold a job (and its GPUs) beyond it."""
        try:
            async with asyncio.timeout(self._pull_timeout):
                if await self._has_image(image):
                    return
                progress = await self._docker.images.pull(image)
        except (DockerError, TimeoutError) as exc:
            detail = exc.message if isinstance(exc, DockerError) else self._pull_timed_out
            raise ImageUnavailable(
                f"image {image!r} is not on this host and pulling it failed: {detail}"
            ) from exc
        errors = [p["error"] for p in progress if isinstance(p, dict) and "error" in p]
        if errors:
            raise ImageUnavailable(
                f"image {image!r} is not on this host and pulling it failed: {errors[-1]}"
            )

    @property
    def _pull_timed_out(self) -> str:
        return f"timed out after {self._pull_timeout:g}s (SANDFLEET_IMAGE_PULL_TIMEOUT_SECONDS)"

    async def _has_image(self, image: str) -> bool:
        try:
            await self._docker.images.inspect(url_path_segment(image))
        except DockerError as exc:
            if exc.status == 404:
                return False
            raise SandboxError(f"docker image inspect {image}: {exc.message}") from exc
        return True

    async def create(self, spec: SandboxSpec[ContainerBlock]) -> SandboxState:
        gpu_route = await self._gpu_route() if spec.gpus else None
        await self._ensure_image(checked_image(spec.image))
        config = container_config(spec, self._limits, gpu_route=gpu_route)
        try:
            container = await self._create_container(config, spec.name)
        except SandboxError:
            if gpu_route is not None:
                self._gpu_support = None  # as for a failed start (below)
            raise
        state = await self._state(container.id)
        if state is None:
            raise SandboxError(f"docker create {spec.name}: the container vanished after creation")
        return state

    async def _create_container(self, config: dict[str, Any], name: str) -> DockerContainer:
        try:
            async with asyncio.timeout(self._create_timeout):
                return await self._docker.containers.create(config, name=name)
        except DockerError as exc:
            error = SandboxNameTaken if exc.status == 409 else SandboxError
            raise error(f"docker create {name}: {exc.message}") from exc
        except TimeoutError as exc:
            message = (
                f"docker create {name}: no answer in {self._create_timeout:g}s "
                "(SANDFLEET_CONTAINER_CREATE_TIMEOUT_SECONDS)"
            )
            raise SandboxError(message) from exc

    async def create_warm(self, spec: WarmSpec[ContainerBlock]) -> SandboxState:
        await self._ensure_image(checked_image(spec.image))
        config = warm_container_config(as_sandbox_spec(spec), self._limits)
        container = await self._create_container(config, spec.name)
        stdin: DockerStdin | None = None
        try:
            stdin = await self._attached(container)
            await self.start(container.id)
            info = await self._inspect(container.id, spec.name)
            image = await self._image_defaults(str(info["Image"]))
        except BaseException:
            await self._discard(container.id, stdin)
            raise
        state = state_from_inspect(info)
        if state.status is not SandboxStatus.RUNNING:
            await self._discard(container.id, stdin)
            raise SandboxError(f"docker start {spec.name}: the warm container exited at once")
        self._waiting.hold(container.id, Waiting(stdin=stdin, image=image, labels=state.labels))
        return state

    async def _attached(self, container: DockerContainer) -> DockerStdin:
        async with _translated("attach", container.id):
            return await DockerStdin.attach(container)

    async def _discard(self, sandbox_id: str, stdin: DockerStdin | None) -> None:
        if stdin is not None:
            await stdin.aclose()
        await self.remove(sandbox_id)

    async def _inspect(self, sandbox_id: str, name: str) -> dict[str, Any]:
        async with _translated("inspect", name):
            info: dict[str, Any] = await self._container(sandbox_id).show()
        return info

    async def _image_defaults(self, image_id: str) -> ImageDefaults:
        """An image's Entrypoint and Cmd, asked once per image id (an id names one
        image for ever, where a tag can move)."""
        if image_id not in self._images:
            async with _translated("image inspect", image_id):
                info = await self._docker.images.inspect(url_path_segment(image_id))
            self._images[image_id] = ImageDefaults.from_config(info.get("Config"))
        return self._images[image_id]

    async def take_warm(self, sandbox_id: str, spec: SandboxSpec[ContainerBlock]) -> SandboxState:
        return await self._waiting.take(sandbox_id, spec, self._rename, self._state)

    async def _rename(self, sandbox_id: str, name: str) -> None:
        try:
            await self._container(sandbox_id).rename(name)
        except DockerError as exc:
            error = SandboxNameTaken if exc.status == 409 else SandboxError
            raise error(f"docker rename {sandbox_id} {name}: {exc.message}") from exc

    async def start(self, sandbox_id: str) -> None:
        try:
            async with _translated("start", sandbox_id):
                await self._container(sandbox_id).start()
        except SandboxError:
            # Docker resolves device requests at start: a GPU route that failed here may
            # be stale (dockerd restarted with CDI off), so the next GPU job asks again.
            self._gpu_support = None
            raise

    async def wait(self, sandbox_id: str) -> int:
        async with _translated("wait", sandbox_id):
            result = await self._container(sandbox_id).wait()
        return int(result["StatusCode"])

    async def stop(self, sandbox_id: str, *, grace_seconds: float) -> None:
        async with _translated("stop", sandbox_id):
            await self._container(sandbox_id).stop(t=int(grace_seconds))

    async def remove(self, sandbox_id: str) -> None:
        await self._waiting.drop(sandbox_id)
        try:
            await self._container(sandbox_id).delete(force=True)
        except DockerError as exc:
            if exc.status != 404:
                raise SandboxError(f"docker rm {sandbox_id}: {exc.message}") from exc

    async def find(self, name: str) -> SandboxState | None:
        return await self._state(name)

    async def list_sandboxes(self) -> list[SandboxState]:
        filters = json.dumps({"label": [f"{LABEL_DRIVER}={self.name}"]})
        async with _translated("ps", "sandfleet containers"):
            containers = await self._docker.containers.list(all=True, filters=filters)
        states = [await self._state(c.id) for c in containers]
        return [s for s in states if s is not None]

    async def output(self, sandbox_id: str, *, lines: int) -> str:
        async with _translated("logs", sandbox_id):
            chunks = await self._container(sandbox_id).log(stdout=True, stderr=True, tail=lines)
        return "".join(chunks)

    async def follow_output(self, sandbox_id: str) -> AsyncIterator[bytes]:
        # docker's logs API with follow: everything from the start, then live, ending
        # when the container does; stdout and stderr interleaved as docker logged them.
        # Its follow can end early, at a log file rotation the container's end follows
        # at once: what docker kept after the last entry read is read once more.
        container, last = self._container(sandbox_id), 0
        async with _translated("logs", sandbox_id):
            followed = container.log(stdout=True, stderr=True, follow=True, timestamps=True)
            async for chunk in followed:
                for at, text in split_entries(chunk):
                    last = max(last, at)
                    yield text.encode()
            rest = await container.log(
                stdout=True, stderr=True, timestamps=True, since=since_param(last)
            )
        for chunk in rest:
            for at, text in split_entries(chunk):
                if at > last:
                    yield text.encode()

    def _container(self, name_or_id: str) -> DockerContainer:
        # aiodocker puts the id into the URL path as it is.
        return self._docker.containers.container(url_path_segment(name_or_id))

    async def _state(self, name_or_id: str) -> SandboxState | None:
        try:
            info = await self._container(name_or_id).show()
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise SandboxError(f"docker inspect {name_or_id}: {exc.message}") from exc
        return state_from_inspect(info)
