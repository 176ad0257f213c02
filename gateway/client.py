"""The Python client: submit jobs, wait for them, follow their events, read their history.

    async with Client("amqp://user:pass@broker/") as client:
        outcome = await client.run(request)           # the job's terminal Event
        print(outcome.phase, outcome.exit_code, outcome.output)

A client declares nothing: a submitter's account (`sandfleet broker setup`, listed in
SECURITY.md) needs no "configure" permission. Replies come back through RabbitMQ's
direct reply-to; every request carries the AMQP user_id of the URL's login, which the
broker checks. `sandfleet.SyncClient` offers the same methods, blocking.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from aio_pika.abc import (
    AbstractRobustConnection,
)

from sandfleet.common.amqp import (
    CONNECT_TIMEOUT_SECONDS,
    broker_login,
    connect,
    redacted_url,
)
from sandfleet.common.broker_urls import check_broker_urls
from sandfleet.common.errors import (
    CancelRefused,
    ClientClosed,
    JobNotFound,
    SubmissionRejected,
)
from sandfleet.common.events import JOB_PHASES, Event, Phase
from sandfleet.common.lifecycle import AsyncCloseable
from sandfleet.common.models import CancelRequest, SandboxRequest, SubmitReply
from sandfleet.common.settings import MAX_BATCH_CEILING, Settings
from sandfleet.common.topology import (
    CANCEL_TYPE,
    QUERIES_EXCHANGE,
    SUBMISSIONS_EXCHANGE,
    SUBMIT_TYPE,
)
from sandfleet.common.view_queries import ViewQuery, ViewReply
from sandfleet.gateway.events_stream import EventFilter, EventStream
from sandfleet.gateway.gateway_requests import GatewayRequests
from sandfleet.gateway.job_log import JobLogStream, job_log_lines
from sandfleet.gateway.submit_batches import Chunk, all_or_none, chunks, replies_of

__all__ = ["Client", "ClientClosed", "EventFilter", "EventStream", "JobRun", "Request"]

REPLY_TIMEOUT_SECONDS = 30.0
VIEW_QUERY_TYPE = "sandfleet.view-query"

Request = SandboxRequest | dict[str, Any] | bytes


class Client(AsyncCloseable):
    """A connection to a sandfleet broker for submitters and watchers.

    `url` defaults to SANDFLEET_BROKER_URL, and an amqps:// URL's TLS settings
    (SANDFLEET_BROKER_CA, _CERT, _KEY) come from `settings`, or else the environment.
    Connecting raises FleetUnreachable when no broker answers within `connect_timeout`
    seconds, TLS fails, or the broker refuses the login.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings or Settings()
        self._url = check_broker_urls(url) if url else self._settings.broker_url
        self._connect_timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._requests: GatewayRequests | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """The broker URL, password hidden."""
        return redacted_url(self._url)

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClientClosed("this Client was closed; make a new one")
        connection = await connect(
            self._url,
            name="sandfleet-client",
            settings=self._settings,
            timeout=self._connect_timeout,
        )
        try:
            self._requests = await GatewayRequests.open(
                connection, shown_url=self.url, login=broker_login(self._url)
            )
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        return self

    async def aclose(self) -> None:
        self._closed = True
        if self._requests is not None:
            self._requests.close()
            self._requests = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def _open_connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise ClientClosed(
                "this Client was closed" if self._closed else "use the Client inside 'async with'"
            )
        return self._connection

    def _open_requests(self) -> GatewayRequests:
        self._open_connection()
        assert self._requests is not None
        return self._requests

    async def submit(
        self, request: Request, *, timeout: float = REPLY_TIMEOUT_SECONDS
    ) -> SubmitReply:
        """Send a request to the gateway and return its reply, accepted or rejected.

        `request` is a SandboxRequest, a dict or the JSON bytes; the gateway validates
        it. FleetUnreachable when no gateway answers within `timeout` seconds.
        """
        body = _request_body(request)
        return await self._ask(body, SUBMIT_TYPE, timeout, resend=_names_its_job(body))

    async def submit_many(
        self,
        requests: Iterable[Request],
        *,
        batch_size: int | None = None,
        in_flight: int = 4,
        timeout: float = REPLY_TIMEOUT_SECONDS,
    ) -> list[SubmitReply]:
        """Submit many requests as batch submissions (`batch_size` each, at most; default
        SANDFLEET_MAX_BATCH), `in_flight` batches at once; one reply per request, in order.

        Each request is validated and answered on its own, as `submit` would have it.
        FleetUnreachable when no gateway answers a batch within `timeout` seconds.
        """
        size = batch_size or self._settings.max_batch
        if not 0 < size <= MAX_BATCH_CEILING or in_flight < 1:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH_CEILING}, in_flight 1 or more")
        bodies = [_request_body(request) for request in requests]
        replies: list[SubmitReply | None] = [None] * len(bodies)
        gate = asyncio.Semaphore(in_flight)
        requests_out = self._open_requests()

        async def send(chunk: Chunk) -> None:
            async with gate:
                raw = await requests_out.ask(
                    chunk.body,
                    SUBMIT_TYPE,
                    exchange=SUBMISSIONS_EXCHANGE,
                    timeout=timeout,
                    resend=chunk.resendable,
                )
            for position, reply in zip(chunk.positions, replies_of(chunk, raw), strict=True):
                replies[position] = reply

        batches = chunks(bodies, batch_size=size, max_bytes=self._settings.max_message_bytes)
        await all_or_none([send(chunk) for chunk in batches])
        return [reply for reply in replies if reply is not None]

    async def _ask(self, body: bytes, kind: str, timeout: float, *, resend: bool) -> SubmitReply:
        """Send `body` (a `kind` message) to the gateway; its reply."""
        reply = await self._open_requests().ask(
            body, kind, exchange=SUBMISSIONS_EXCHANGE, timeout=timeout, resend=resend
        )
        return SubmitReply.model_validate_json(reply)

    async def query(self, query: ViewQuery, *, timeout: float = REPLY_TIMEOUT_SECONDS) -> ViewReply:
        """Ask a gateway's job view (`sandfleet status/jobs/stats`): FleetUnreachable when
        no gateway with a view answers within `timeout` seconds."""
        body = query.model_dump_json(exclude_defaults=True).encode()
        reply = await self._open_requests().ask(
            body, VIEW_QUERY_TYPE, exchange=QUERIES_EXCHANGE, timeout=timeout, resend=True
        )
        return ViewReply.model_validate_json(reply)

    async def status(self, job_id: str, *, timeout: float = REPLY_TIMEOUT_SECONDS) -> ViewReply:
        """A job as a gateway's view has it: phase, host, worker, GPUs, timings, history."""
        return await self.query(ViewQuery(kind="status", job_id=job_id), timeout=timeout)

    async def jobs(self, **filters: Any) -> ViewReply:
        """Jobs newest first, filtered (ViewQuery's fields: phase, driver, host, labels,
        submitted_by, since_seconds, limit)."""
        return await self.query(ViewQuery(kind="jobs", **filters))

    async def stats(self, *, since_seconds: float | None = None) -> ViewReply:
        """p50/p95/p99 of each stage of ended jobs' lives, overall, per driver and host."""
        return await self.query(ViewQuery(kind="stats", since_seconds=since_seconds))

    async def wait(self, job_id: str, *, timeout: float | None = None) -> Event:
        """The job's terminal event (succeeded, failed, timed_out, cancelled, rejected),
        at once if it has ended, else when it does.

        The job's latest event in the log decides: a job id rejected and then submitted
        again is waited for anew. JobNotFound when the log holds no event of the job;
        TimeoutError after `timeout` seconds.
        """
        async with asyncio.timeout(timeout), self.events(job_id=job_id, from_start=True) as stream:
            outcome = await stream.job_outcome(known_only=True)
        if outcome is None:
            raise JobNotFound(job_id)
        return outcome

    @asynccontextmanager
    async def start(self, request: Request) -> AsyncIterator[JobRun]:
        """Submit `request`, already subscribed to the events so none is missed:

            async with client.start(request) as job:
                print(job.reply.job_id)
                async for event in job:  # ends with the terminal event
                    ...

        SubmissionRejected when the gateway refuses the request.
        """
        async with self.events(phases=JOB_PHASES) as stream:  # not the heartbeat log
            reply = await self.submit(request)
            if not reply.accepted:
                raise SubmissionRejected(reply)
            yield JobRun(self, stream, reply)

    async def run(self, request: Request, *, timeout: float | None = None) -> Event:
        """Submit `request` and return its terminal event (see `wait`).

        SubmissionRejected when the gateway refuses it; TimeoutError after `timeout`
        seconds. A job id already in the fleet is not run again: its outcome is returned.
        """
        async with asyncio.timeout(timeout), self.start(request) as job:
            return await job.outcome()

    async def cancel(
        self,
        job_id: str,
        *,
        reason: str = "cancelled by request",
        timeout: float = REPLY_TIMEOUT_SECONDS,
    ) -> None:
        """Ask the gateway to cancel `job_id`: running, waiting for GPUs or still queued.

        Only the job's submitter (this client's login) and the fleet's admins may. Once
        the gateway accepts, the worker that holds the job (or later receives it) emits
        `cancelled`; a job that has ended stays as it ended. CancelRefused when the
        gateway refuses (an unknown job, or another's); ValueError for a malformed id.
        """
        body = CancelRequest(job_id=job_id, reason=reason).model_dump_json().encode()
        reply = await self._ask(body, CANCEL_TYPE, timeout, resend=True)
        if not reply.accepted:
            raise CancelRefused(reply)

    def events(
        self,
        *,
        job_id: str | None = None,
        driver: str | None = None,
        host: str | None = None,
        phases: Collection[Phase] = (),
        from_start: bool = False,
        since: datetime | None = None,
    ) -> EventStream:
        """Live events matching the filter; `from_start` replays the log's history first,
        `since` only the history written from that time on."""
        match = EventFilter(job_id=job_id, driver=driver, host=host, phases=phases)
        if since is not None:
            return self._stream(match, since)
        return self._stream(match, "first" if from_start else "next")

    def _stream(self, match: EventFilter, offset: str | datetime) -> EventStream:
        return EventStream(self._open_connection(), match, offset=offset, shown_url=self.url)

    async def workers(self, *, since: timedelta = timedelta(minutes=10)) -> list[Event]:
        """Each worker's latest heartbeat within `since` (see `common.events.worker_state`)."""
        match = EventFilter(phases={Phase.HEARTBEAT})
        latest: dict[str, Event] = {}
        async with self._stream(match, datetime.now(UTC) - since) as stream:
            async for event in stream.history():
                latest[event.worker_id or ""] = event
        return sorted(latest.values(), key=lambda e: (e.host, e.driver or "", e.worker_id or ""))

    def logs(
        self, job_id: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        """Job `job_id`'s output lines (stdout and stderr together) as shipped so far,
        or the last `tail` of them; with `follow`, then the rest as it is printed, until
        the job's log ends. JobNotFound if the event log holds no event of the job."""
        return job_log_lines(self, job_id, follow=follow, tail=tail)

    def job_log(self, job_id: str, *, offset: datetime) -> JobLogStream:
        """Job `job_id`'s messages on the log stream, read from time `offset` on."""
        return JobLogStream(self._open_connection(), job_id, offset=offset, shown_url=self.url)

    async def history(self, job_id: str) -> list[Event]:
        """Every event the log holds for `job_id`, oldest first; [] if none."""
        async with self.events(job_id=job_id, from_start=True) as stream:
            return [event async for event in stream.history()]


class JobRun:
    """A submitted job: the gateway's `reply`; iterated, the job's events to its end."""

    def __init__(self, client: Client, stream: EventStream, reply: SubmitReply) -> None:
        self._client = client
        self._stream = stream
        self.reply = reply

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        if self.reply.duplicate:
            # Submitted before: its events are in the log, not ahead in this stream.
            yield await self._client.wait(self.reply.job_id)
            return
        async for event in self._stream:
            if event.job_id == self.reply.job_id:
                yield event
                if event.phase.is_terminal:
                    return

    async def outcome(self) -> Event:
        """The job's terminal event."""
        last: Event | None = None
        async for last in self:  # noqa: B007 (only the last one matters)
            pass
        assert last is not None and last.phase.is_terminal
        return last


def _request_body(request: Request) -> bytes:
    if isinstance(request, SandboxRequest):
        return request.model_dump_json(exclude_none=True).encode()
    if isinstance(request, dict):
        return json.dumps(request).encode()  # the gateway validates; its reply names the errors
    return request


def _names_its_job(body: bytes) -> bool:
    """Whether a submission names its job id: only then is sending it twice harmless
    (the gateway answers the second as a duplicate; without an id it would make a new job)."""
    try:
        job_id = json.loads(body).get("job_id")
    except (ValueError, AttributeError):
        return False
    return isinstance(job_id, str) and bool(job_id)
