"""The gateway's process tuning, in a process of its own (it changes process-wide state)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from sandfleet.gateway.process_tuning import FRAME_BUFFER_SIZE, GC_THRESHOLDS

PROBE = textwrap.dedent(
    """
    import asyncio, gc
    import aiormq
    from sandfleet.gateway.process_tuning import tune_gateway_process

    async def frame_buffer() -> int:
        return aiormq.Connection("amqp://nobody@127.0.0.1:1/").write_queue.maxsize

    print(asyncio.run(frame_buffer()), gc.get_threshold())
    tune_gateway_process()
    print(asyncio.run(frame_buffer()), gc.get_threshold(), gc.get_freeze_count() > 0)
    """
)


def test_the_gateway_process_gets_a_deeper_frame_buffer_and_a_larger_young_generation() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "10 (700, 10, 10)"  # what the tuning changes, untouched until it runs
    assert out[1] == f"{FRAME_BUFFER_SIZE} {GC_THRESHOLDS} True"


def test_importing_the_gateway_tunes_nothing() -> None:
    """A program using sandfleet as a library keeps aiormq's and the collector's defaults."""
    probe = "import gc, aiormq, sandfleet.gateway.cli; " + (
        "print(aiormq.Connection.FRAME_BUFFER_SIZE, gc.get_threshold(), gc.get_freeze_count())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10 (700, 10, 10) 0"
