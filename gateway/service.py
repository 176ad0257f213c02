"""The gateway: consumes `sandfleet.submit`, admits or rejects, routes jobs to driver queues.

A submission is one request or a batch of them (`sandfleet.gateway.batch`); each request
goes through `sandfleet.gateway.admission` (its `accepted` event confirmed, then read back
as the id's first `accepted` in the log before its job is published, the job confirmed
before the reply says `accepted`), and many go at once: up to
SANDFLEET_GATEWAY_CONCURRENCY submissions in hand, each batch's requests together.
Cancellation requests arrive on the same queue and go to `sandfleet.gateway.cancel_desk`.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any, Self

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from sandfleet.common.amqp import connect, send_reply, settle
from sandfleet.common.broker_urls import node_address, split_broker_urls, vhost_of
from sandfleet.common.cluster_start import start_when_cluster_ready
from sandfleet.common.errors import RequestInvalid
from sandfleet.common.event_coalescing import CoalescedEvents
from sandfleet.common.event_publisher import EventPublisher
from sandfleet.common.event_replay import EchoedEvents, fresh_events
from sandfleet.common.events import Event, Phase
from sandfleet.common.lifecycle import AsyncCloseable
from sandfleet.common.metrics import connection_up, consuming_on, metrics_served
from sandfleet.common.models import BatchReply, SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.common.topology import (
    CANCEL_TYPE,
    EVENTS_LOG_QUEUE,
    SUBMIT_QUEUE,
    Topology,
    declare_topology,
)
from sandfleet.gateway.admission import Admission
from sandfleet.gateway.batch import answer_batch, batch_items, refused_batch
from sandfleet.gateway.cancel_desk import CancelDesk
from sandfleet.gateway.job_index import JobIndex
from sandfleet.gateway.job_view import JobView
from sandfleet.gateway.metrics import GatewayMetrics
from sandfleet.gateway.ownership import Ownership
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
        self._coalesced: CoalescedEvents | None = None
        self._routes: RouteChecker | None = None
        self._depths: RouteChecker | None = None
        self._jobs: JobIndex | None = None
        self.view = JobView(
            settings.view_path,
            log=mirrored_log(settings.broker_url),
            max_age_seconds=settings.events_max_age_seconds,
            host=settings.host,
        )
        self._admission: Admission | None = None
        self._cancels: CancelDesk | None = None
        self._signer = job_signer(settings)
        self.metrics = GatewayMetrics()
        self._consuming = False
        self._in_hand: set[asyncio.Task[None]] = set()  # submissions being handled

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
        try:
            if self._events is not None:
                await self._events.aclose()
            if self._coalesced is not None:
                await self._coalesced.aclose()
            for task in self._in_hand:
                task.cancel()
        finally:
            # Always: a robust connection left open goes on reconnecting in a task that
            # ignores cancellation (aio-pika#414), and the process would never exit.
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
        # Each admission's `accepted` goes out with those of the submissions in hand.
        pack = settings.pack_events
        self._coalesced = CoalescedEvents(EventPublisher(self._topology.events, pack=pack))
        self._events = EchoedEvents(
            self._coalesced,
            partial(fresh_events, self._connection, pack=pack),
            echo=self._echoed,
        )
        await self._events.__aenter__()
        self._routes = RouteChecker(self._connection)
        self._jobs = JobIndex(await self._connection.channel(), self.view)
        await self._jobs.start()  # know every job id in the log before taking submissions
        await ViewDesk(await self._connection.channel(), self.view, host=settings.host).start()
        ownership = Ownership(self._jobs, settings.admin_logins)
        self._admission = Admission(
            settings,
            jobs=self._jobs,
            ownership=ownership,
            events=self._events,
            job_exchange=self._topology.jobs,
            route_exists=self._routes.exists,
            signer=self._signer,
        )
        self._cancels = CancelDesk(
            self._channel,
            self._topology.control,
            self._events,
            ownership,
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
        """Consuming submissions: connected, the submissions' channel open (`/healthz`)."""
        return self._consuming and consuming_on(self._connection, self._channel)

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
        try:
            await self._disconnect()
        finally:
            await self.view.aclose()

    @property
    def jobs(self) -> JobIndex | None:
        """The job ids this gateway knows, from the event log (None before it starts)."""
        return self._jobs

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

    def _on_submission(self, message: AbstractIncomingMessage) -> asyncio.Task[None]:
        # In a task of the gateway's own: aiormq cancels a consumer's callback when its
        # connection is lost, which would cut a submission between its `accepted` event
        # and its job's publish, and the redelivered submission would then be answered
        # as a duplicate of a job never queued. The task rides the outage out (the
        # publish is retried on the new connection); its ack, on the lost channel, fails,
        # and the redelivered copy is answered as the duplicate it is. A plain function,
        # not a coroutine: aio-pika then calls it without a task of its own per
        # submission (the prefetch still bounds how many are in hand).
        task = asyncio.create_task(settle(message, self._handle))
        self._in_hand.add(task)
        task.add_done_callback(self._in_hand.discard)
        return task

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        if message.type == CANCEL_TYPE:
            assert self._cancels is not None
            await self._cancels.handle(message)
            return
        assert self._admission is not None
        settings = self._settings
        try:
            items = batch_items(
                message.body,
                max_bytes=settings.max_message_bytes,
                max_batch=settings.max_batch,
            )
        except RequestInvalid as exc:
            await self._admission.refuse(message.user_id, exc)
            await self._reply(message, refused_batch(exc))
            raise
        if items is not None:
            await self._handle_batch(message, items)
            return
        reply = await self._admission.answer(
            message.body, message.user_id, redelivered=bool(message.redelivered)
        )
        await self._reply(message, reply)
        if not reply.accepted:
            raise RequestInvalid(reply.errors)  # dead-lettered, as the event says

    async def _handle_batch(self, message: AbstractIncomingMessage, items: list[Any]) -> None:
        assert self._admission is not None
        admission, submitter = self._admission, message.user_id

        async def one(body: bytes, data: Any) -> SubmitReply:
            reply = await admission.answer(
                body, submitter, redelivered=bool(message.redelivered), data=data
            )
            self.metrics.answered(reply)
            return reply

        await self._reply(message, await answer_batch(items, one))

    async def _reply(
        self, message: AbstractIncomingMessage, reply: SubmitReply | BatchReply
    ) -> None:
        # On the confirmed channel: a channel of replies' own, unconfirmed, saved a round
        # trip, but was left closed after a cluster node's loss (no gateway answered
        # again: tests/faults/test_cluster_failover.py).
        assert self._channel is not None
        await send_reply(self._channel, message, reply)
        if isinstance(reply, SubmitReply):
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
