"""Which libpod answers mean "that container is not there"."""

from __future__ import annotations

import pytest

from sandfleet.workers.drivers.podman.client import PodmanApiError


@pytest.mark.parametrize(
    ("status", "message", "gone"),
    [
        (404, "no container with name or ID x found", True),
        # Podman 4.3, inspecting a container another client removed a moment ago:
        (500, "container 3dd4 does not exist in database: no such container", True),
        (500, "runtime error: crun failed", False),
        (409, "container is running", False),
    ],
)
def test_no_such_container(status: int, message: str, gone: bool) -> None:
    assert PodmanApiError(status, message).no_such_container is gone
