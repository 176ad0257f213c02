"""Process-wide logging for the sandfleet services."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler


def setup_logging(level: str) -> None:
    # stderr: stdout belongs to what a command prints (`--json` output included).
    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True)
        line_format = "%(name)s: %(message)s"
    else:
        # A log file, journald or `docker logs`: one plain line per record, never wrapped.
        handler = logging.StreamHandler(sys.stderr)
        line_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=line_format, handlers=[handler])
    # aio-pika logs every reconnect attempt at length; our own lines say what matters.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
