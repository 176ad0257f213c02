"""The gateway: consumes `sandfleet.submit`, admits or rejects, routes jobs to driver queues.

For each submission, in this order:
    identify (the broker-checked AMQP user_id) → decode → admit (envelope rules)
    → the job id is the submitter's to use → check the route exists → `accepted` event
    → read back as the id's first `accepted` in the log (several gateways: job_index)
    → sign and publish the job (persistent, confirmed, mandatory) → reply.
The `accepted` event is confirmed before the job is published, so no worker event
for a job can precede it in the event log. Cancellation requests arrive on the same
queue and go to `sandfleet.gateway.cancel_desk`.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Self

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from aio_pika.exceptions import PublishError

from sandfleet.common.amqp import (
    EventPublisher,
    connect,
    job_message,
    publish_through_outages,
    send_reply,
    settle,
)
from sandfleet.common.broker_urls import node_address, split_broker_urls, vhost_of
from sandfleet.common.cluster_start import start_when_cluster_ready
from sandfleet.common.errors import FieldError, MessageUndecodable, RequestInvalid, bounded_errors
from sandfleet.common.event_replay import EchoedEvents, fresh_events
from sandfleet.common.events import Event, Phase
from sandfleet.common.lifecycle import AsyncCloseable
from sandfleet.common.metrics import connection_up, metrics_served
from sandfleet.common.models import Job, ReplyStatus, SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.common.signing import signed
from sandfleet.common.topology import (
    CANCEL_TYPE,
    EVENTS_LOG_QUEUE,
    SUBMIT_QUEUE,
    Topology,
    declare_topology,
    job_queue_name,
    job_routing_key,
)
from sandfleet.gateway.cancel_desk import CancelDesk
from sandfleet.gateway.envelope import admit, decode, new_job_id
from sandfleet.gateway.job_index import JobIndex
from sandfleet.gateway.job_view import JobView
from sandfleet.gateway.metrics import GatewayMetrics
from sandfleet.gateway.ownership import UNIDENTIFIED, Ownership
from sandfleet.gateway.route_checker import RouteChecker
from sandfleet.gateway.signer import job_signer, say_how_signed
from sandfleet.gateway.view_desk import ViewDesk

log = logging.getLogger(__name__)


class Gateway(AsyncCloseable):
    """`async with Gateway(settings) as gw: await gw.serve_forever()`"""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._topology: Topology | None = None
        self._events: EchoedEvents | None = None
        self._routes: RouteChecker | None = None
        self._depths: RouteChecker | None = None
        self._jobs: JobIndex | None = None
        self.view = JobView(
            settings.view_path,
            log=mirrored_log(settings.broker_url),
            max_age_seconds=settings.events_max_age_seconds,
            host=settings.host,
        )
        self._ownership: Ownership | None = None
        self._cancels: CancelDesk | None = None
        self._signer = job_signer(settings)
        self.metrics = GatewayMetrics()
        self._consuming = False
        self._in_hand: set[asyncio.Task[None]] = set()  # submissions being handled
        # accepted, but not queued yet (their publish failed, or their place in the log
        # is not known yet): job id → (job, its `accepted` event's id)
        self._unqueued: dict[str, tuple[Job, str]] = {}

    async def __aenter__(self) -> Self:
        await self.view.open()
        try:
            await start_when_cluster_ready(self._start, self._disconnect)
        except BaseException:
            await self.view.aclose()
            raise
        return self

    async def _disconnect(self) -> None:
        self._consuming = False
        if self._events is not None:
            await self._events.aclose()
        for task in self._in_hand:
            task.cancel()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self._depths = None  # on the connection just closed

    async def _start(self) -> None:
        settings = self._settings
        self._connection = await connect(
            settings.broker_url, name=f"sandfleet-gateway@{settings.host}", settings=settings
        )
        say_how_signed(self._signer)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._topology = await declare_topology(self._connection, self._channel)
        self._events = EchoedEvents(
            EventPublisher(self._topology.events),
            partial(fresh_events, self._connection),
            echo=self._echoed,
        )
        await self._events.__aenter__()
        self._routes = RouteChecker(self._connection)
        self._jobs = JobIndex(await self._connection.channel(), self.view)
        await self._jobs.start()  # know every job id in the log before taking submissions
        await ViewDesk(await self._connection.channel(), self.view, host=settings.host).start()
        self._ownership = Ownership(self._jobs, settings.admin_logins)
        self._cancels = CancelDesk(
            self._channel,
            self._topology.control,
            self._events,
            self._ownership,
            signer=self._signer,
            host=settings.host,
        )
        await self._channel.set_qos(prefetch_count=settings.gateway_concurrency)
        submit = await self._channel.get_queue(SUBMIT_QUEUE)
        await submit.consume(self._on_submission)
        self._consuming = True
        log.info("gateway on %s consuming %s", settings.host, SUBMIT_QUEUE)

    @property
    def healthy(self) -> bool:
        """Consuming submissions: connected, not reconnecting (`/healthz`)."""
        return self._consuming and connection_up(self._connection)

    @property
    def jobs(self) -> JobIndex | None:
        """The job ids this gateway knows, from the event log (None before it starts)."""
        return self._jobs

    async def refresh_metrics(self) -> None:
        """The depths of the submission queue and of the job queues routed to so far."""
        if self._routes is not None and connection_up(self._connection):
            queues = {SUBMIT_QUEUE, *self._routes.known}
            # A channel of the scrapes' own: a queue deleted since closes the channel its
            # look-up fails on, which must not be one a submission is using.
            if self._depths is None:
                assert self._connection is not None
                self._depths = RouteChecker(self._connection)
            await self.metrics.refresh_depths(self._depths.message_count, queues)

    async def aclose(self) -> None:
        await self._disconnect()
        await self.view.aclose()

    async def _echoed(self, event: Event) -> bool:
        """Which of its events the gateway publishes again (common.event_replay): each
        `accepted`, but one the log shows another `accepted` took the id before (a
        twin's, from another gateway). Not a rejection: echoed after the id was accepted
        since, it would free the id for a second run. (Having read an event from the
        log proves nothing: a stream can lose a message its readers have already seen.)"""
        if event.phase is not Phase.ACCEPTED or event.job_id is None or self._jobs is None:
            return False
        return self._jobs.accepted_by(event.job_id) in (None, event.event_id)

    async def serve_forever(self) -> None:
        """Serve until cancelled (the CLI cancels on SIGINT/SIGTERM)."""
        await asyncio.Event().wait()

    async def _on_submission(self, message: AbstractIncomingMessage) -> None:
        # In a task of the gateway's own: aiormq cancels a consumer's callback when its
        # connection is lost, which would cut a submission between its `accepted` event
        # and its job's publish, and the redelivered submission would then be answered
        # as a duplicate of a job never queued. The task rides the outage out (the
        # publish is retried on the new connection); its ack, on the lost channel, fails,
        # and the redelivered copy is answered as the duplicate it is.
        task = asyncio.create_task(settle(message, self._handle))
        self._in_hand.add(task)
        task.add_done_callback(self._in_hand.discard)
        await asyncio.shield(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        if message.type == CANCEL_TYPE:
            assert self._cancels is not None
            await self._cancels.handle(message)
            return
        assert self._ownership is not None
        submitter, data = message.user_id, None
        try:
            if not submitter:
                raise RequestInvalid([UNIDENTIFIED])
            data = decode(message.body, max_bytes=self._settings.max_message_bytes)
            job = admit(message.body, self._settings)
        except MessageUndecodable as exc:
            error = FieldError(field="request", message=str(exc))
            rejection_id = self._ownership.rejection_id(data, submitter)
            await self._reject(message, rejection_id, [error], "MalformedMessage")
            raise
        except RequestInvalid as exc:
            rejection_id = self._ownership.rejection_id(data, submitter)
            await self._reject(message, rejection_id, exc.errors, "InvalidRequest")
            raise
        await self._route(message, job.model_copy(update={"submitted_by": submitter}))

    async def _route(self, message: AbstractIncomingMessage, job: Job) -> None:
        assert self._jobs is not None and self._ownership is not None
        assert job.submitted_by is not None
        if refusal := self._ownership.submit_refusal(job.job_id, job.submitted_by):
            await self._reject(message, new_job_id(), [refusal], "JobIdTaken")
            raise RequestInvalid([refusal])
        if (phase := self._jobs.existing(job.job_id)) is not None:
            if (accepted := self._unqueued.pop(job.job_id, None)) is not None:
                await self._settle_then_queue(message, *accepted)  # its acceptance stands
                return
            await self._reply_duplicate(message, job.job_id, phase)
            return
        # No await since the checks: concurrent twins see it.
        self._jobs.reserve(job.job_id, job.submitted_by)
        try:
            event_id = await self._accept(message, job)
        except BaseException:
            self._jobs.forget(job.job_id)
            raise
        await self._settle_then_queue(message, job, event_id)

    async def _settle_then_queue(
        self, message: AbstractIncomingMessage, job: Job, event_id: str
    ) -> None:
        """Queue `job` if its `accepted` event took the id: the first for it in the log,
        which every gateway reads alike (job_index). A twin accepted by another gateway
        a moment before is answered as the duplicate it is."""
        assert self._jobs is not None and self._ownership is not None
        try:
            took = await self._jobs.settled(job.job_id, event_id)
        except BaseException:
            # Its place in the log not read yet (a timeout, a shutdown): not queued but
            # kept, and settled when its submission comes back, never accepted twice.
            self._unqueued[job.job_id] = (job, event_id)
            raise
        if took:
            await self._queue_or_keep(message, job, event_id)
            return
        assert job.submitted_by is not None
        if refusal := self._ownership.submit_refusal(job.job_id, job.submitted_by):
            await self._reject(message, new_job_id(), [refusal], "JobIdTaken")
            raise RequestInvalid([refusal])
        phase = self._jobs.existing(job.job_id) or Phase.ACCEPTED
        await self._reply_duplicate(message, job.job_id, phase)

    async def _reply_duplicate(
        self, message: AbstractIncomingMessage, job_id: str, phase: Phase
    ) -> None:
        reply = SubmitReply(status=ReplyStatus.ACCEPTED, job_id=job_id, duplicate=True, phase=phase)
        await self._reply(message, reply)

    async def _queue_or_keep(
        self, message: AbstractIncomingMessage, job: Job, event_id: str
    ) -> None:
        assert self._jobs is not None
        try:
            await self._queue(message, job)
        except RequestInvalid:  # unroutable after all: rejected, and the id free again
            self._jobs.forget(job.job_id)
            raise
        except BaseException:
            # Accepted (its event is out) but not queued: kept, and queued when its
            # submission comes back (redelivered, or sent again), never accepted twice.
            self._unqueued[job.job_id] = (job, event_id)
            raise

    async def _accept(self, message: AbstractIncomingMessage, job: Job) -> str:
        """Publish `job`'s `accepted` event (its route checked first); its event_id."""
        assert self._routes is not None
        queue = job_queue_name(job.driver, job.placement.host)
        if not await self._routes.exists(queue):
            raise RequestInvalid(await self._unroutable(message, job))
        event = await self._emit(job, Phase.ACCEPTED, "Accepted", f"queued on {queue}")
        return event.event_id

    async def _queue(self, message: AbstractIncomingMessage, job: Job) -> None:
        assert self._topology is not None
        host = job.placement.host
        message_out = job_message(signed(job, self._signer))
        jobs = self._topology.jobs
        try:
            # Through a lost node too: the connection moves to another and the publish
            # is made again. A copy that did land before is run once (the host journal).
            await publish_through_outages(
                lambda: jobs.publish(
                    message_out, routing_key=job_routing_key(job.driver, host), mandatory=True
                ),
                what=f"job {job.job_id}",
            )
        except PublishError as exc:
            log.warning("job %s unroutable after acceptance: %s", job.job_id, exc)
            raise RequestInvalid(await self._unroutable(message, job)) from exc
        await self._reply(message, SubmitReply(status=ReplyStatus.ACCEPTED, job_id=job.job_id))

    async def _unroutable(self, message: AbstractIncomingMessage, job: Job) -> list[FieldError]:
        if job.placement.host:
            error = FieldError(
                field="placement.host",
                message=f"no {job.driver} worker serves host {job.placement.host!r}",
            )
        else:
            error = FieldError(field="driver", message=f"no worker serves driver {job.driver!r}")
        await self._reject(message, job.job_id, [error], "Unroutable", driver=job.driver)
        return [error]

    async def _reject(
        self,
        message: AbstractIncomingMessage,
        job_id: str,
        errors: list[FieldError],
        reason: str,
        *,
        driver: str | None = None,
    ) -> None:
        assert self._events is not None
        errors = bounded_errors(errors)  # a huge request must not make a huge event
        summary = "; ".join(str(e) for e in errors)
        await self._events.publish(
            Event(
                job_id=job_id,
                phase=Phase.REJECTED,
                reason=reason,
                message=summary,
                driver=driver,
                host=self._settings.host,
                submitted_by=message.user_id,
                errors=errors,
            )
        )
        reply = SubmitReply(status=ReplyStatus.REJECTED, job_id=job_id, errors=errors)
        await self._reply(message, reply)

    async def _emit(self, job: Job, phase: Phase, reason: str, text: str) -> Event:
        assert self._events is not None
        event = Event(
            job_id=job.job_id,
            phase=phase,
            reason=reason,
            message=text,
            driver=job.driver,
            host=self._settings.host,
            submitted_by=job.submitted_by,
            labels=job.labels or None,
        )
        await self._events.publish(event)
        return event

    async def _reply(self, message: AbstractIncomingMessage, reply: SubmitReply) -> None:
        assert self._channel is not None
        await send_reply(self._channel, message, reply)
        self.metrics.answered(reply)


def mirrored_log(broker_url: str) -> str:
    """Which event log a view mirrors: broker address and vhost (not the login, which a
    password rotation may change), and the log's name."""
    nodes = split_broker_urls(broker_url)
    vhost = vhost_of(broker_url)
    address = ",".join(sorted(node_address(node) for node in nodes))
    return f"{address} {vhost} {EVENTS_LOG_QUEUE}"


async def run_gateway(settings: Settings) -> None:
    """The gateway, with /metrics and /healthz served from before it connects (503 then)."""
    gateway = Gateway(settings)
    served = metrics_served(
        gateway.metrics.registry,
        settings,
        healthy=lambda: gateway.healthy,
        before_scrape=gateway.refresh_metrics,
    )
    async with served, gateway:
        await gateway.serve_forever()
