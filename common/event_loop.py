"""The event loop the gateway runs on: uvloop when it is installed (the `fast` extra:
`pip install 'sandfleet[fast]'`), asyncio's own otherwise. uvloop gathers a turn's
socket writes into one system call, where asyncio makes one per frame; a gateway
admitting thousands of jobs a second writes several frames for each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    try:
        import uvloop  # noqa: PLC0415 (optional)
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
