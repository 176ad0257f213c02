"""sandfleet: run container and VM sandboxes, with or without GPUs, on a fleet of hosts.

    import sandfleet

    with sandfleet.SyncClient("amqp://user:pass@broker/") as client:
        outcome = client.run({"template": {"image": "busybox", "command": ["true"]}})

`sandfleet.Client` is the same, async. Importing this package loads the client side
only: no runtime libraries (Docker, libvirt) are imported.
"""

from importlib.metadata import PackageNotFoundError, version

from sandfleet.common.errors import (
    CancelRefused,
    ClientClosed,
    FieldError,
    FleetUnreachable,
    JobNotFound,
    SubmissionRejected,
)
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import SandboxRequest, SubmitReply
from sandfleet.gateway.client import Client
from sandfleet.gateway.sync_client import SyncClient

try:
    __version__ = version("sandfleet")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CancelRefused",
    "Client",
    "ClientClosed",
    "Event",
    "FieldError",
    "FleetUnreachable",
    "JobNotFound",
    "Phase",
    "SandboxRequest",
    "SubmissionRejected",
    "SubmitReply",
    "SyncClient",
    "__version__",
]
