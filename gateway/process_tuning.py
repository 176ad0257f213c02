"""The gateway process's two runtime knobs, each measured with bench.gateway_throughput
(README, Benchmarks). Set once, in `sandfleet gateway` only, before its first connection:
a program that imports sandfleet as a library keeps its own settings.

- **aiormq's frame buffer.** aiormq queues at most 10 marshalled frames for a
  connection's writer. A gateway admitting a batch publishes a job per request at once:
  from the 11th on, each publish waits, holding its channel's lock, for the writer to
  run, and the rest queue on that lock one loop pass each. 1,024 frames let a pass's
  publishes reach the socket in one write. Each queued entry is the bytes of a publish
  already in hand (an admission in flight holds its body anyway), so the deeper queue
  bounds nothing the gateway's concurrency does not.
- **The cyclic garbage collector.** Thousands of admissions are in flight at once (64
  submissions of up to SANDFLEET_MAX_BATCH requests), each a few dozen objects that
  live for milliseconds: with CPython's default thresholds they outlive the young
  generations and pile up in the oldest, whose collections then walk hundreds of
  thousands of objects several times a second (a third of the gateway's CPU in a batch
  run). A larger young generation lets them die young, and freezing what start-up
  imported (modules, functions, validators: immortal here) keeps it out of every
  collection. Cyclic garbage still goes, after 50,000 allocations instead of 700.
"""

from __future__ import annotations

import gc

import aiormq.connection

FRAME_BUFFER_SIZE = 1024
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gateway_process() -> None:
    """Call once, after the imports and before the event loop starts."""
    aiormq.connection.Connection.FRAME_BUFFER_SIZE = FRAME_BUFFER_SIZE
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
