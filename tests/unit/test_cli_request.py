from __future__ import annotations

from typing import Any

import pytest
import typer

from sandfleet.gateway.request_flags import build_request


def flags(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "driver": None, "image": "busybox", "command": ["true"], "env": [], "labels": [],
        "timeout": None, "gpu_count": None, "gpu_devices": [], "host": None, "job_id": None,
        "cpu": None, "memory": None,
    }  # fmt: skip
    return {**values, **overrides}


def test_plain_flags() -> None:
    request = build_request(**flags(env=["A=1", "B=x=y"], timeout=5, host="h1", memory="1Gi"))
    assert request == {
        "template": {
            "image": "busybox",
            "command": ["true"],
            "environment": {"A": "1", "B": "x=y"},
            "timeout_seconds": 5,
        },
        "resource_requirements": {"memory": "1Gi"},
        "placement": {"host": "h1"},
    }


def test_gpu_devices_set_the_count_and_the_active_block() -> None:
    request = build_request(
        **flags(driver="podman", gpu_count=7, gpu_devices=["nvidia.com/gpu=0", "nvidia.com/gpu=1"])
    )
    assert request["resource_requirements"] == {"gpu": {"count": 2}}
    assert request["template"]["driver_config"] == {
        "podman": {"gpu_device_ids": ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]}
    }


def test_bad_env_pair_is_refused() -> None:
    with pytest.raises(typer.BadParameter):
        build_request(**flags(env=["NOEQUALS"]))
