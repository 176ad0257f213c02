"""A sandfleet driver whose sandboxes live in the worker's memory.

Nothing runs: a sandbox "prints" its block's `output` (or its command, as `echo` would)
and exits with its block's `exit_code` after `run_seconds`. Tests steer it further
through `InMemoryDriver.hooks` (wait before an operation, fail it, change the world).
"""

from sandfleet_inmemory.driver import InMemoryBlock, InMemoryDriver, InMemorySandbox
from sandfleet_inmemory.plugin import InMemorySettings, plugin

__all__ = ["InMemoryBlock", "InMemoryDriver", "InMemorySandbox", "InMemorySettings", "plugin"]
