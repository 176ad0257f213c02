"""The VM driver (libvirt; `pip install .[vm]`). See README.md beside this file."""

from workers.drivers.vm.driver import VmDriver

__all__ = ["VmDriver"]
