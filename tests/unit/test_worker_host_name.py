"""A worker whose host name is a container's id must be told its host's name: that
name changes with every container, and a worker's host name is its host queue and
its journal."""

from __future__ import annotations

import pytest

from sandfleet.common.errors import SandfleetError
from sandfleet.common.settings import Settings
from sandfleet.workers import cli
from sandfleet.workers.cli import require_host_name


def test_a_container_id_for_a_host_name_without_sandfleet_host_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SANDFLEET_HOST", raising=False)
    monkeypatch.setattr("socket.gethostname", lambda: "3f2a9c0d1b7e")
    with pytest.raises(SandfleetError, match=r"SANDFLEET_HOST is not set.*\(3f2a9c0d1b7e\)"):
        require_host_name(Settings())


def test_a_machine_name_or_a_given_host_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDFLEET_HOST", raising=False)
    monkeypatch.setattr("socket.gethostname", lambda: "gpu-07")
    require_host_name(Settings())
    monkeypatch.setattr("socket.gethostname", lambda: "3f2a9c0d1b7e")
    monkeypatch.setenv("SANDFLEET_HOST", "gpu-07")
    require_host_name(Settings())
    assert cli.CONTAINER_ID_HOST_NAME.fullmatch("gpu-07") is None
