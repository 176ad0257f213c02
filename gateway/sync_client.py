"""The blocking client, for scripts and notebooks: the async Client run on an event loop
of its own, in a daemon thread.

    with SyncClient("amqp://user:pass@broker/") as client:
        outcome = client.run(request)
        with client.events(job_id="train-42") as stream:
            for event in stream:
                ...

The loop lives in its own thread, so this works where a loop already runs in the
calling thread (Jupyter). Every method runs the async one there and waits for it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Coroutine, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any, Protocol, Self, TypeVar

from sandfleet.common.amqp import CONNECT_TIMEOUT_SECONDS
from sandfleet.common.errors import ClientClosed
from sandfleet.common.events import Event, Phase
from sandfleet.common.lifecycle import Closeable
from sandfleet.common.models import SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.common.view_queries import ViewReply
from sandfleet.gateway.client import REPLY_TIMEOUT_SECONDS, Client, Request
from sandfleet.gateway.events_stream import EventStream

T = TypeVar("T")


class _Runs(Protocol):
    """Runs a coroutine on the client's loop and returns its result."""

    def __call__(self, coroutine: Coroutine[Any, Any, T], /) -> T: ...


class _LoopThread:
    """An event loop running forever in a daemon thread, until `stop()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="sandfleet-client", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: stop the work in the loop too
            raise

    def stop(self) -> None:
        self.call(_cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_the_rest() -> None:
    """Cancel what the client left running (aio-pika's helpers) so the loop closes clean."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class SyncClient(Closeable):
    """`Client`'s methods, blocking. Connects on `with` (or the first call); `close()`
    (or leaving the `with`) disconnects and stops the loop thread; a closed client
    raises ClientClosed."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self._client = Client(url, settings=settings, connect_timeout=connect_timeout)
        self._thread: _LoopThread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        """The broker URL, password hidden."""
        return self._client.url

    def __enter__(self) -> Self:
        self.open()
        return self

    def open(self) -> None:
        """Connect now (methods connect on first use otherwise)."""
        self._loop_thread()

    def close(self) -> None:
        """Disconnect and stop the loop thread; safe to call again."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            try:
                thread.call(self._client.aclose())
            finally:
                thread.stop()

    def _loop_thread(self) -> _LoopThread:
        with self._lock:
            if self._closed:
                raise ClientClosed("this SyncClient was closed; make a new one")
            if self._thread is None:
                thread = _LoopThread()
                try:
                    thread.call(self._client.__aenter__())
                except BaseException:
                    thread.stop()
                    raise
                self._thread = thread
            return self._thread

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            thread = self._loop_thread()
        except BaseException:
            coroutine.close()  # never awaited: say so quietly
            raise
        return thread.call(coroutine)

    def submit(self, request: Request, *, timeout: float = REPLY_TIMEOUT_SECONDS) -> SubmitReply:
        """See `Client.submit`."""
        return self._call(self._client.submit(request, timeout=timeout))

    def submit_many(
        self,
        requests: Iterable[Request],
        *,
        batch_size: int | None = None,
        in_flight: int = 4,
        timeout: float = REPLY_TIMEOUT_SECONDS,
    ) -> list[SubmitReply]:
        """See `Client.submit_many`."""
        return self._call(
            self._client.submit_many(
                requests, batch_size=batch_size, in_flight=in_flight, timeout=timeout
            )
        )

    def wait(self, job_id: str, *, timeout: float | None = None) -> Event:
        """See `Client.wait`."""
        return self._call(self._client.wait(job_id, timeout=timeout))

    def run(self, request: Request, *, timeout: float | None = None) -> Event:
        """See `Client.run`."""
        return self._call(self._client.run(request, timeout=timeout))

    def cancel(self, job_id: str, *, reason: str = "cancelled by request") -> None:
        """See `Client.cancel`."""
        self._call(self._client.cancel(job_id, reason=reason))

    def history(self, job_id: str) -> list[Event]:
        """See `Client.history`."""
        return self._call(self._client.history(job_id))

    def status(self, job_id: str) -> ViewReply:
        """`Client.status`: the job as a gateway's view has it."""
        return self._call(self._client.status(job_id))

    def jobs(self, **filters: Any) -> ViewReply:
        """`Client.jobs`: jobs newest first, filtered."""
        return self._call(self._client.jobs(**filters))

    def stats(self, *, since_seconds: float | None = None) -> ViewReply:
        """`Client.stats`: percentiles of each stage of ended jobs' lives."""
        return self._call(self._client.stats(since_seconds=since_seconds))

    def workers(self, *, since: timedelta = timedelta(minutes=10)) -> list[Event]:
        """See `Client.workers`."""
        return self._call(self._client.workers(since=since))

    def events(
        self,
        *,
        job_id: str | None = None,
        driver: str | None = None,
        host: str | None = None,
        phases: Collection[Phase] = (),
        from_start: bool = False,
        since: datetime | None = None,
    ) -> SyncEventStream:
        """See `Client.events`: a blocking iterator, best used as a context manager."""

        async def make() -> EventStream:
            return self._client.events(
                job_id=job_id,
                driver=driver,
                host=host,
                phases=phases,
                from_start=from_start,
                since=since,
            )

        return SyncEventStream(self._call, self._call(make()))


class SyncEventStream(Closeable):
    """`EventStream`, blocking: `with client.events(...) as stream: for event in stream:`.

    Subscribed on `with` (or the first `next`); iteration stops at a `mark_end()`
    marker, and iterating again goes on live."""

    def __init__(self, call: _Runs, stream: EventStream) -> None:
        self._call = call
        self._stream = stream
        self._iterator: AsyncIterator[Event] | None = None

    def __enter__(self) -> Self:
        self._call(self._stream.__aenter__())
        return self

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._iterator is None:
            self._iterator = aiter(self._stream)
        try:
            return self._call(_next(self._iterator))
        except StopAsyncIteration:
            self._iterator = None
            raise StopIteration from None

    def mark_end(self) -> None:
        """See `EventStream.mark_end`."""
        self._call(self._stream.mark_end())

    def close(self) -> None:
        """Unsubscribe; safe to call again, and after the client closed (which ended it)."""
        iterator, self._iterator = self._iterator, None
        try:
            if isinstance(iterator, AsyncGenerator):
                self._call(iterator.aclose())
            self._call(self._stream.aclose())
        except ClientClosed:
            pass


async def _next(iterator: AsyncIterator[Event]) -> Event:
    return await anext(iterator)
