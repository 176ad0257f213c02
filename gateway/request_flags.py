"""The request that `sandfleet submit`'s flags describe (the gateway does the validating)."""

from __future__ import annotations

from typing import Any

import typer

from sandfleet.common.settings import Settings


def _parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        result[key] = value
    return result


def build_request(
    *,
    driver: str | None,
    image: str | None,
    command: list[str],
    env: list[str],
    labels: list[str],
    timeout: int | None,
    gpu_count: int | None,
    gpu_devices: list[str],
    host: str | None,
    job_id: str | None,
    cpu: str | None,
    memory: str | None,
) -> dict[str, Any]:
    """The request the submit flags describe; the gateway does the validating."""
    if image is None:
        raise typer.BadParameter(
            "an image is required (or give the whole request with -f)", param_hint="--image"
        )
    template: dict[str, Any] = {"image": image, "command": command}
    if env:
        template["environment"] = _parse_pairs(env, "--env")
    if timeout is not None:
        template["timeout_seconds"] = timeout
    resources: dict[str, Any] = {}
    if gpu_devices:
        # The IDs name the GPUs, so they also say how many.
        gpu_count = len(gpu_devices)
        block_driver = driver or Settings().default_driver
        template["driver_config"] = {block_driver: {"gpu_device_ids": gpu_devices}}
    if gpu_count is not None:
        resources["gpu"] = {"count": gpu_count}
    if cpu is not None:
        resources["cpu"] = cpu
    if memory is not None:
        resources["memory"] = memory
    request: dict[str, Any] = {"template": template}
    if resources:
        request["resource_requirements"] = resources
    if driver:
        request["driver"] = driver
    if host:
        request["placement"] = {"host": host}
    if job_id:
        request["job_id"] = job_id
    if labels:
        request["labels"] = _parse_pairs(labels, "--label")
    return request
