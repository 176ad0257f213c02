"""Requests to the gateways and their replies: the transport under `sandfleet.Client`.

One confirmed channel publishes each request with RabbitMQ's direct reply-to and
consumes the replies; a future per correlation id waits for its reply. Nothing is
declared, so a submitter needs no "configure" permission.

A request that is safe to send twice (a submission that names its job id, a
cancellation, a view query) is sent again when the connection is lost before its
reply came: with a URL list the connection comes back on another node, and the
reply of the first send, if there was one, went to a channel that is gone. The
gateway answers a repeated job id as a duplicate, so the job is still queued once.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import suppress
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelNotFoundEntity, PublishError
from aiormq.exceptions import AMQPConnectionError, AMQPError, ChannelInvalidStateError

from sandfleet.common.amqp import JSON
from sandfleet.common.cluster_start import cluster_still_starting
from sandfleet.common.errors import ClientClosed, FleetUnreachable
from sandfleet.common.topology import SUBMISSIONS_EXCHANGE

# RabbitMQ's pseudo-queue for replies: no queue to declare, no permission needed, and
# the reply comes back on the channel that published the request.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

_LOST = (ChannelInvalidStateError, AMQPConnectionError)
RESEND_PAUSE_SECONDS = 0.2


class _ConnectionLost(Exception):
    """The connection went away between a request's publish and its reply."""


class GatewayRequests:
    """`await GatewayRequests.open(connection, shown_url=…, login=…)`, then `ask`."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        channel: AbstractRobustChannel,
        shown_url: str,
        login: str,
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._shown_url = shown_url  # for errors: the broker URL, password hidden
        self._login = login
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._exchanges_seen: set[str] = set()
        self._reconnected = asyncio.Event()  # replaced by each reconnection

    @classmethod
    async def open(
        cls, connection: AbstractRobustConnection, *, shown_url: str, login: str
    ) -> GatewayRequests:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        requests = cls(connection, channel, shown_url, login)
        # Passive, so the robust channel re-consumes after a reconnect; it needs no
        # permission. Consuming comes first: the broker refuses a request that names
        # direct reply-to on a channel with no such consumer.
        replies = await requests._channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await replies.consume(requests._on_reply, no_ack=True)
        # A reply sent to the channel before it came back is lost: ask again then.
        connection.reconnect_callbacks.add(requests._on_reconnect)
        channel.reopen_callbacks.add(requests._on_reconnect)
        # Looked up now, outside any request's timeout (a later request looks again if
        # no gateway had run yet).
        with suppress(FleetUnreachable, _ConnectionLost):
            await requests._check_gateway_ran(SUBMISSIONS_EXCHANGE)
        return requests

    def close(self) -> None:
        """Fail every request still waiting for its reply (the connection is closing)."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ClientClosed("the Client was closed before the reply came"))

    def _on_reconnect(self, *_: object) -> None:
        self._reconnected.set()
        self._reconnected = asyncio.Event()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def ask(
        self, body: bytes, kind: str, *, exchange: str, timeout: float, resend: bool
    ) -> bytes:
        """Send `body` (a `kind` message) to the gateways through `exchange`; the reply.

        With `resend`, sent again (within `timeout`) whenever the connection is lost
        before the reply; without, FleetUnreachable then."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        return await self._send_once(body, kind, exchange)
                    except _ConnectionLost:
                        if not resend:
                            raise FleetUnreachable(
                                self._shown_url, "the connection to the broker was lost"
                            ) from None
        except TimeoutError:
            raise FleetUnreachable(
                self._shown_url, f"no gateway answered within {timeout:g} s"
            ) from None

    async def _send_once(self, body: bytes, kind: str, exchange: str) -> bytes:
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            # While the robust connection reconnects, wait for the channel and its
            # reply consumer to be back rather than fail at once.
            await self._channel.ready()
            reconnected = self._reconnected
            try:
                await self._publish(body, kind, correlation_id, exchange)
            except _ConnectionLost:
                # Briefly: the channel may not know yet that it is gone (ready() at
                # once again); once it knows, ready() waits for it to be back.
                await asyncio.sleep(RESEND_PAUSE_SECONDS)
                raise
            lost: asyncio.Future[Any] = asyncio.ensure_future(reconnected.wait())
            try:
                await asyncio.wait([future, lost], return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
            if not future.done():
                raise _ConnectionLost
            return future.result()
        finally:
            self._pending.pop(correlation_id, None)

    async def _publish(self, body: bytes, kind: str, correlation_id: str, exchange: str) -> None:
        await self._check_gateway_ran(exchange)
        message = aio_pika.Message(
            body,
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            type=kind,
            user_id=self._login,  # checked by the broker: the gateway learns who asks
        )
        # An exchange object only: looking it up on this channel would close the channel
        # (and its reply consumer) if it were missing; _check_gateway_ran has seen it.
        target = await self._channel.get_exchange(exchange, ensure=False)
        try:
            await target.publish(message, routing_key="", mandatory=True)
        except PublishError:  # returned: the queue is missing
            raise FleetUnreachable(
                self._shown_url, f"no gateway has run here (no queue behind {exchange})"
            ) from None
        except _LOST:  # lost since ready()
            raise _ConnectionLost from None
        except AMQPError as exc:
            # The robust connection restoring a log consumer on a node that has just
            # restarted (406 "does not have a replica on the local node") fails what
            # is in flight with it: the connection moves on, and the request is sent
            # again as after any loss.
            if cluster_still_starting(exc):
                raise _ConnectionLost from None
            raise

    async def _check_gateway_ran(self, exchange: str) -> None:
        if exchange in self._exchanges_seen:
            return
        try:
            # Shielded: a caller's timeout must not cut the look-up channel's opening
            # or closing short, which can leave the connection unusable.
            await asyncio.shield(self._look_up(exchange))
        except (*_LOST, RuntimeError):  # aio-pika's "connection was not opened", too
            raise _ConnectionLost from None

    async def _look_up(self, exchange: str) -> None:
        # A channel of its own: a missing exchange closes the channel it is looked up on.
        async with self._connection.channel() as channel:
            try:
                await channel.get_exchange(exchange)  # passive: no permission
            except ChannelNotFoundEntity:
                raise FleetUnreachable(
                    self._shown_url, f"no gateway has run here (no exchange {exchange})"
                ) from None
        self._exchanges_seen.add(exchange)
