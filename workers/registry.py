"""Finding drivers by name: the entry-point group `sandfleet.drivers`.

docker, podman and vm register there from sandfleet's own distribution, exactly as a
third-party driver package does from its own; nothing here knows their names.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from sandfleet.workers.drivers.base import DriverPlugin

GROUP = "sandfleet.drivers"


class UnknownDriver(LookupError):
    def __init__(self, name: str, installed: list[str]) -> None:
        self.name, self.installed = name, installed
        known = ", ".join(installed) or "none"
        super().__init__(f"no driver named {name!r} is installed (installed: {known})")


class BrokenDriver(RuntimeError):
    """A registered driver that cannot be loaded (a missing library, a wrong object)."""


def installed() -> dict[str, EntryPoint]:
    """Every registered driver by name; loading none of them."""
    return {ep.name: ep for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)}


def load(name: str) -> DriverPlugin[Any]:
    """The plugin registered as `name`; UnknownDriver or BrokenDriver if it can't be had."""
    registered = installed()
    entry_point = registered.get(name)
    if entry_point is None:
        raise UnknownDriver(name, list(registered))
    try:
        plugin = entry_point.load()
    except ImportError as exc:
        raise BrokenDriver(
            f"driver {name!r} ({entry_point.value}) cannot be imported: {exc}"
        ) from exc
    if not isinstance(plugin, DriverPlugin) or plugin.name != name:
        raise BrokenDriver(
            f"{entry_point.value} is registered as driver {name!r} but is not a DriverPlugin "
            f"named {name!r}"
        )
    return plugin
