"""Shipping jobs' output (workers.log_shipping, common.job_logs) and following a VM's
console, on fakes: what is shipped, in what order, and where it is cut."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aio_pika import Message
from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.events import Phase
from sandfleet.common.job_logs import (
    JOB_ID_HEADER,
    LOG_END_TYPE,
    SEQUENCE_HEADER,
    LineSplitter,
    OutputCap,
    truncation_line,
)
from sandfleet.workers.drivers.docker.log_entries import since_param, split_entries, split_entry
from sandfleet.workers.drivers.podman.client import FrameReader, demultiplex
from sandfleet.workers.drivers.vm.console_follow import (
    _JobPart,
    follow_console,
    wait_for_exit_marker,
)
from sandfleet.workers.log_shipping import LogShipper, OutputBuffer
from tests.support.fakes import harness, job


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at these offsets (any order, repeats allowed)."""
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(st.binary(max_size=300), st.lists(st.integers(0, 300)), st.integers(0, 200))
def test_the_cap_ships_a_prefix_then_one_truncation_line(
    data: bytes, cuts: list[int], limit: int
) -> None:
    cap = OutputCap(limit)
    shipped = b"".join(cap.admit(chunk) for chunk in cut(data, cuts))
    if len(data) <= limit:
        assert (shipped, cap.reached) == (data, False)
        return
    kept = data[:limit]
    newline = b"\n" if kept and not kept.endswith(b"\n") else b""  # wherever the chunks end
    assert shipped == kept + newline + truncation_line(limit)
    assert cap.reached and cap.admit(b"more") == b""


@given(st.binary(max_size=300), st.lists(st.integers(0, 300)))
def test_lines_are_the_same_however_the_output_is_cut(data: bytes, cuts: list[int]) -> None:
    splitter = LineSplitter()
    lines = [line for chunk in cut(data, cuts) for line in splitter.feed(chunk)]
    lines += splitter.rest()
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert lines == [line.decode(errors="replace") for line in expected]


def frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0, 0, 0]) + struct.pack(">I", len(payload)) + payload


@given(
    st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=40)), max_size=8),
    st.lists(st.integers(0, 400)),
)
def test_podman_frames_cut_anywhere_read_as_whole(
    frames: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    reader = FrameReader()
    payloads = b"".join(reader.feed(chunk) for chunk in cut(stream, cuts))
    assert payloads.decode(errors="replace") == demultiplex(stream)


class SlowExchange:
    """Publishing takes a while, as with publisher confirms from a busy broker."""

    def __init__(self) -> None:
        self.published: list[tuple[Message, str]] = []
        self.delay = 0.0

    async def publish(self, message: Message, routing_key: str) -> None:
        await asyncio.sleep(self.delay)
        self.published.append((message, routing_key))


async def chunks_of(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(0)  # printed one at a time


async def ship(exchange: SlowExchange, output: AsyncIterator[bytes], **settings: Any) -> None:
    shipper = LogShipper(exchange, routing_key="docker.h1", **settings)  # type: ignore[arg-type]
    shipper.begin("a", output)
    async with asyncio.timeout(5):
        await shipper.end("a")


async def test_a_jobs_output_is_shipped_in_order_then_ended() -> None:
    exchange = SlowExchange()
    exchange.delay = 0.01  # lines printed meanwhile go out together
    await ship(exchange, chunks_of(*(b"%d\n" % i for i in range(200))), max_bytes_per_job=1 << 20)
    messages = [message for message, _ in exchange.published]
    headers = [m.headers for m in messages]
    assert {key for _, key in exchange.published} == {"docker.h1"}
    assert all(h[JOB_ID_HEADER] == "a" for h in headers)
    assert [h[SEQUENCE_HEADER] for h in headers] == list(range(len(messages)))
    assert messages[-1].type == LOG_END_TYPE and messages[-1].body == b""
    assert b"".join(m.body for m in messages) == b"".join(b"%d\n" % i for i in range(200))
    assert len(messages) < 100  # batched: not one message per line


async def test_output_past_the_cap_is_not_read_or_shipped() -> None:
    exchange, read = SlowExchange(), []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            read.append(b"x" * 10 + b"\n")
            yield read[-1]
            await asyncio.sleep(0)

    await ship(exchange, endless(), max_bytes_per_job=100)
    body = b"".join(message.body for message, _ in exchange.published)
    # 9 whole lines and a line cut after its first byte: 100 bytes, then the marker
    assert body == (b"x" * 10 + b"\n") * 9 + b"x\n" + truncation_line(100)
    assert len(read) == 10  # it stopped reading where it cut


async def test_a_backlog_slower_than_the_idle_limit_is_shipped_whole() -> None:
    exchange = SlowExchange()

    async def backlog() -> AsyncIterator[bytes]:
        for i in range(50):  # handed over slowly: 1 s in all, ten times the idle limit
            await asyncio.sleep(0.02)
            yield b"%d\n" % i

    shipper = LogShipper(exchange, routing_key="docker.h1", max_bytes_per_job=1 << 20)  # type: ignore[arg-type]
    shipper.begin("a", backlog())
    async with asyncio.timeout(5):
        await shipper.end("a", idle_seconds=0.1)
    body = b"".join(message.body for message, _ in exchange.published)
    assert body == b"".join(b"%d\n" % i for i in range(50))


async def test_a_stream_that_never_ends_is_cut_off_once_idle() -> None:
    exchange = SlowExchange()

    async def stuck() -> AsyncIterator[bytes]:
        yield b"only line\n"
        await asyncio.Event().wait()

    shipper = LogShipper(exchange, routing_key="docker.h1", max_bytes_per_job=100)  # type: ignore[arg-type]
    shipper.begin("a", stuck())
    async with asyncio.timeout(5):
        await shipper.end("a", idle_seconds=0.1)
    assert [m.body for m, _ in exchange.published] == [b"only line\n", b""]
    assert exchange.published[-1][0].type == LOG_END_TYPE


async def test_a_job_that_never_started_gets_an_end_of_log_alone() -> None:
    exchange = SlowExchange()
    shipper = LogShipper(exchange, routing_key="docker.h1", max_bytes_per_job=100)  # type: ignore[arg-type]
    await shipper.end("never-started")
    [(message, _)] = exchange.published
    assert message.type == LOG_END_TYPE


async def test_the_buffer_holds_at_most_its_limit() -> None:
    buffer = OutputBuffer(limit=4)
    await buffer.put(b"12345")  # one chunk over the limit is taken whole
    blocked = asyncio.create_task(buffer.put(b"6"))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # the reader waits: the runtime keeps the rest meanwhile
    assert await buffer.take() == b"12345"
    await asyncio.wait_for(blocked, 1)
    await buffer.close()
    assert (await buffer.take(), await buffer.take()) == (b"6", None)


async def test_the_runner_ends_a_jobs_log_before_its_terminal_event(tmp_path: Path) -> None:
    h = harness(tmp_path)
    async with asyncio.timeout(5):
        await h.runner.handle(h.delivery(job("a", output="hello\n")))
    assert h.logs.output["a"] == b"hello\n"
    assert h.logs.phases_at_end["a"] == [Phase.STARTING, Phase.RUNNING]
    assert h.events.phases("a")[-1] is Phase.SUCCEEDED


async def test_a_vm_console_is_followed_from_the_jobs_begin_marker(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"booting\r\nSANDFLEET_BEGIN\r\nfirst\r\n")
    running = [True]

    async def still_running() -> bool:
        return running[0]

    following = follow_console(console, still_running, poll_seconds=0.01)
    async with asyncio.timeout(5):
        assert await anext(following) == b"first\n"
        with console.open("ab") as more:
            more.write(b"second\r\nSANDFLEET_EXIT=0\r\n")
        rest = b"".join([chunk async for chunk in following])  # ends at the marker
    assert rest == b"second\n"  # the job's: not its exit marker, nor the power-off


@pytest.mark.parametrize("cut", range(1, 40))
def test_a_vm_jobs_output_ends_at_its_exit_marker_however_the_console_is_cut(cut: int) -> None:
    console = (
        b"boot\r\nSANDFLEET_BEGIN\r\nSANDFLEET_EXITS\nx SANDFLEET_EXIT=1\n"
        b"SANDFLEET_EXIT=7\r\npower off\n"
    )
    part = _JobPart()
    kept = part.feed(console[:cut]) + part.feed(console[cut:]) + part.rest()
    assert kept == b"SANDFLEET_EXITS\nx SANDFLEET_EXIT=1\n" and part.ended


def test_a_vm_jobs_unfinished_last_line_is_kept_once_the_guest_stopped() -> None:
    part = _JobPart()
    assert part.feed(b"SANDFLEET_BEGIN\nprogress 50%") == b"progress 50%"  # shipped live
    assert part.feed(b"\nSANDFLEET_EXIT=") == b"\n"  # may become the marker: held
    assert part.rest() == b"SANDFLEET_EXIT="  # it did not: the job's after all
    assert not part.ended


async def test_waiting_for_a_vm_jobs_end_returns_at_its_exit_marker(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"SANDFLEET_BEGIN\nwork\n")
    running: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(wait_for_exit_marker(console, running, poll_seconds=0.01))
    with console.open("ab") as more:
        more.write(b"SANDFLEET_EXIT=3\n")  # the guest still powers off: `running` not done
    async with asyncio.timeout(5):
        assert await waiting is True
    running.set_result(None)
    assert await wait_for_exit_marker(tmp_path / "none.log", running) is False


async def test_a_vm_console_rotated_while_followed_is_read_from_the_new_files_start(
    tmp_path: Path,
) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"SANDFLEET_BEGIN\n" + b"x" * 100 + b"\n")
    running = [True]

    async def still_running() -> bool:
        return running[0]

    following = follow_console(console, still_running, poll_seconds=0.01)
    async with asyncio.timeout(5):
        assert await anext(following) == b"x" * 100 + b"\n"
        console.rename(tmp_path / "console.log.0")  # as virtlogd rotates it
        console.write_bytes(b"after rotation\n")
        assert await anext(following) == b"after rotation\n"
        running[0] = False
        assert [chunk async for chunk in following] == []


@given(st.integers(0, 4_000_000_000 * 10**9 - 1), st.text(max_size=30))
def test_a_docker_entrys_time_and_text_read_back(unix_nanos: int, text: str) -> None:
    seconds, nanos = divmod(unix_nanos, 10**9)
    when = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f".{nanos:09d}".rstrip("0").rstrip(".")  # docker drops trailing zeros
    assert split_entry(f"{when}{fraction}Z {text}") == (unix_nanos, text)
    assert since_param(unix_nanos) == f"{seconds}.{nanos:09d}"


def test_a_docker_chunk_of_several_entries_gives_each_its_own_time() -> None:
    """Read as one entry, the chunk's first time would be taken for the last line's, and
    a follower reading on from it would ship `last` twice (seen in CI)."""
    chunk = "2026-11-27T19:00:00.000000001Z err\n2026-11-27T19:00:00.000000002Z last\n"
    first, second = split_entries(chunk)
    assert first[1] == "err\n" and second[1] == "last\n"
    assert second[0] == first[0] + 1
    assert split_entries("2026-11-27T19:00:00Z no newline") == [
        (split_entry("2026-11-27T19:00:00Z x")[0], "no newline")
    ]
