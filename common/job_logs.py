"""Jobs' output on the log stream: what a worker ships and a reader reads back.

A worker publishes each job's output to sandfleet.logs under `<driver>.<host>` as it is
printed, in chunks of whole bytes (a chunk may end inside a line). Each message names
its job and its place in the job's output in headers; the last one is an end-of-log
message with no body. sandfleet.logs.log (a stream) keeps them for SANDFLEET_LOGS_MAX_AGE,
sandbox or no sandbox.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aio_pika

LOG_CHUNK_TYPE = "sandfleet.log-chunk"
LOG_END_TYPE = "sandfleet.log-end"
JOB_ID_HEADER = "x-sandfleet-job-id"
SEQUENCE_HEADER = "x-sandfleet-seq"


def log_message(
    job_id: str, sequence: int, body: bytes = b"", *, end: bool = False
) -> aio_pika.Message:
    """Chunk number `sequence` of a job's output (or, with `end`, the end-of-log message)."""
    return aio_pika.Message(
        body,
        type=LOG_END_TYPE if end else LOG_CHUNK_TYPE,
        headers={JOB_ID_HEADER: job_id, SEQUENCE_HEADER: sequence},
    )


def truncation_line(limit_bytes: int) -> bytes:
    return (
        f"[sandfleet: output truncated after {limit_bytes} bytes "
        "(SANDFLEET_MAX_LOG_BYTES_PER_JOB)]\n"
    ).encode()


class OutputCap:
    """At most `limit_bytes` of a job's output; then one truncation line, then nothing."""

    def __init__(self, limit_bytes: int) -> None:
        self._left = limit_bytes
        self._limit = limit_bytes
        self._line_open = False  # what was admitted so far ends inside a line
        self.reached = False

    def admit(self, chunk: bytes) -> bytes:
        """What of `chunk` may be shipped (the truncation line where the cap is hit)."""
        if self.reached:
            return b""
        if len(chunk) <= self._left:
            self._left -= len(chunk)
            if chunk:
                self._line_open = not chunk.endswith(b"\n")
            return chunk
        kept = chunk[: self._left]
        self._left, self.reached = 0, True
        if kept:
            self._line_open = not kept.endswith(b"\n")
        # The truncation line starts a line of its own, even where the cap cut one.
        newline = b"\n" if self._line_open else b""
        return kept + newline + truncation_line(self._limit)


class LineSplitter:
    """Chunks cut anywhere → whole lines (without their newlines), decoded leniently."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        *whole, self._partial = (self._partial + chunk).split(b"\n")
        for line in whole:
            yield line.decode(errors="replace")

    def rest(self) -> Iterator[str]:
        """The last line, if the output did not end with a newline."""
        if self._partial:
            yield self._partial.decode(errors="replace")
            self._partial = b""


async def lines_of(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    splitter = LineSplitter()
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.rest():
        yield line
