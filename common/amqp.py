"""AMQP helpers shared by the gateway, the workers and the client."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from sandfleet.common.broker_urls import node_address, split_broker_urls, vhost_of
from sandfleet.common.errors import DeadLetter, FleetUnreachable
from sandfleet.common.events import Event
from sandfleet.common.failover import FailoverConnection
from sandfleet.common.models import Job
from sandfleet.common.settings import Settings
from sandfleet.common.tls import TLSSettingsInvalid, tls_context_for, why_tls_failed

log = logging.getLogger(__name__)

JSON = "application/json"
JOB_TYPE = "sandfleet.job"


CONNECT_TIMEOUT_SECONDS = 10.0

# Loggers that narrate a failed connection attempt; the first attempt's failure is
# reported once, as FleetUnreachable, so their lines would only repeat it.
_CONNECTION_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection")


async def connect(
    url: str,
    *,
    name: str,
    settings: Settings | None = None,
    timeout: float = CONNECT_TIMEOUT_SECONDS,
) -> AbstractRobustConnection:
    """A robust connection: aio-pika reconnects and restores channels, queues and consumers.

    An amqps:// URL is TLS as `settings` say (see `sandfleet.common.tls`; no settings: the
    system's CAs, no client certificate). Only the first attempt can fail: within
    `timeout` seconds it is made or it raises FleetUnreachable, naming the URL with its
    password hidden and why. Later outages are the robust connection's to ride out.
    `url` may list one cluster's nodes (`sandfleet.common.broker_urls`): the first that
    answers serves, and the connection moves to another when its node goes away.
    """
    nodes = split_broker_urls(url)
    try:
        context = tls_context_for(nodes[0], settings)
    except TLSSettingsInvalid as exc:
        raise FleetUnreachable(redacted_url(url), f"TLS: {exc}") from None
    if len(nodes) == 1:
        try:
            return await _connect_to(nodes, name=name, context=context, timeout=timeout)
        except (aiormq.exceptions.AMQPError, OSError) as exc:  # TimeoutError is an OSError
            raise FleetUnreachable(redacted_url(url), _why_unreachable(exc, url)) from None
    reasons = []
    for start in range(len(nodes)):  # the first node that answers
        in_turn = nodes[start:] + nodes[:start]
        try:
            return await _connect_to(in_turn, name=name, context=context, timeout=timeout)
        except (aiormq.exceptions.AMQPError, OSError) as exc:
            node = nodes[start]
            reasons.append(f"{node_address(node)}: {_why_unreachable(exc, node)}")
    raise FleetUnreachable(redacted_url(url), "no node answered (" + "; ".join(reasons) + ")")


async def _connect_to(
    nodes: list[str], *, name: str, context: ssl.SSLContext | None, timeout: float
) -> AbstractRobustConnection:
    """A robust connection, first to nodes[0]; with several, one that fails over."""
    properties: dict[str, Any] = {"connection_name": name}
    with _quiet(_CONNECTION_LOGGERS):
        # aio-pika bounds the attempt itself and then stops trying; an outer timeout
        # would leave its reconnect loop running behind a connection nobody holds.
        if len(nodes) == 1:
            return await aio_pika.connect_robust(
                nodes[0], timeout=timeout, ssl_context=context, client_properties=properties
            )
        connection = FailoverConnection(nodes, ssl_context=context, client_properties=properties)
        try:
            await connection.connect(timeout=timeout)
        except BaseException:
            await connection.close()
            raise
        return connection


def redacted_url(url: str) -> str:
    """`url` with its password replaced by `***`, fit to print and log (each URL of a
    list)."""
    if "," in url:
        return ",".join(redacted_url(node) for node in split_broker_urls(url))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<an unparsable URL>"
    if password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def broker_login(url: str) -> str:
    """The login `url` connects as (AMQP's default, guest, when it names none): the
    AMQP user_id a client sets, which the broker checks against its login (one for
    every URL of a list)."""
    return unquote(urlsplit(split_broker_urls(url)[0]).username or "") or "guest"


def _why_unreachable(exc: BaseException, url: str) -> str:
    tls_reason = why_tls_failed(exc, url)
    if tls_reason is not None:
        return tls_reason
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return "the broker refused the login (user name or password)"
    if isinstance(exc, TimeoutError):
        return "no answer from the broker in time"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # The broker closes the connection instead of opening the virtual host.
        vhost = vhost_of(url)
        return f"the broker refused virtual host {vhost!r} (missing, or not open to this user)"
    code, text = (*exc.args, None, None)[:2]
    if isinstance(code, int) and isinstance(text, str):
        # An OS error as (errno, text); resolver errors have negative codes.
        reason = os.strerror(code) if code > 0 else text
    else:
        reason = str(exc) or type(exc).__name__
    return _without_password(reason, url)


def _without_password(text: str, url: str) -> str:
    password = urlsplit(url).password or ""
    for secret in (password, unquote(password)):
        if secret:
            text = text.replace(secret, "***")
    return text


def _drop_record(record: logging.LogRecord) -> bool:
    return False


@contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(_drop_record)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_drop_record)


def json_message(model: BaseModel, **properties: object) -> aio_pika.Message:
    return aio_pika.Message(
        model.model_dump_json().encode(),
        content_type=JSON,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **properties,  # type: ignore[arg-type]
    )


def json_properties(
    *,
    message_id: str | None = None,
    message_type: str | None = None,
    correlation_id: str | None = None,
    persistent: bool = True,
) -> aiormq.spec.Basic.Properties:
    """A JSON message's properties, as `publish_body` takes them."""
    return aiormq.spec.Basic.Properties(
        content_type=JSON,
        delivery_mode=int(aio_pika.DeliveryMode.PERSISTENT) if persistent else None,
        message_id=message_id,
        message_type=message_type,
        correlation_id=correlation_id,
    )


async def publish_body(
    exchange: AbstractExchange,
    body: bytes,
    properties: aiormq.spec.Basic.Properties,
    *,
    routing_key: str,
    mandatory: bool,
) -> None:
    """`exchange.publish` for the gateway's hot path (an event, a job, a reply each
    admission): no aio-pika Message to build, and no wait for the frame to be written,
    which the broker's confirm (on a confirming channel) says anyway. A return (an
    unroutable mandatory message) or a nack raises as with `exchange.publish`."""
    # Every aio-pika exchange has its channel; the ABC does not declare it.
    on: AbstractChannel = exchange.channel  # type: ignore[attr-defined]
    if on.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{on!r} closed")
    channel = cast(aiormq.Channel, await on.get_underlay_channel())  # the ABC lacks `wait`
    await channel.basic_publish(
        body,
        exchange=exchange.name,
        routing_key=routing_key,
        properties=properties,
        mandatory=mandatory,
        wait=False,
    )


def job_message(
    job: Job, *, headers: dict[str, Any] | None = None, expiration: float | None = None
) -> aio_pika.Message:
    """A job as it travels on the job queues (gateway → driver queue → host queue → retry)."""
    return json_message(
        job, message_id=job.job_id, type=JOB_TYPE, headers=headers, expiration=expiration
    )


# What a broker outage looks like to a publisher: the robust connection is
# reconnecting, so the same publish succeeds a little later.
BROKER_UNAVAILABLE = (
    TimeoutError,  # a confirm lost with the old connection never arrives
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


PUBLISH_TIMEOUT_SECONDS = 10.0


def broker_unavailable(exc: BaseException) -> bool:
    """Whether a publish failed for the broker's absence, not for what it published:
    one of BROKER_UNAVAILABLE, or the bare `Exception` aiormq gives the confirms its
    channel leaves unanswered when it closes without a reason (a node lost while its
    confirms were on the way: seen in the cluster fault test, where an `accepted` event
    so "failed" had in fact been logged, and its submission, redelivered, logged a
    second one)."""
    return isinstance(exc, BROKER_UNAVAILABLE) or type(exc) is Exception


class EventSink(Protocol):
    async def publish(self, event: Event) -> None: ...


async def publish_through_outages(
    publish: Callable[[], Awaitable[object]], *, what: str, retry_seconds: float = 120.0
) -> None:
    """`publish()`, retried while the broker is away (`retry_seconds` at most): the
    robust connection comes back, and the same publish succeeds then. Each attempt is
    bounded, waits inside a reconnecting channel included."""
    try:  # the first attempt without tenacity, whose bookkeeping shows in a profile
        async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
            await publish()
        return
    except Exception as exc:
        if not broker_unavailable(exc):
            raise
        log.warning("%s not published (%r); retrying", what, exc)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(broker_unavailable),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(retry_seconds),
        before_sleep=lambda state: log.warning(
            "%s not published (%s); retrying", what, state.outcome
        ),
        reraise=True,
    ):
        with attempt:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await publish()


# Names only the broker gives out: a client may not declare a queue whose name starts "amq.".
REPLY_QUEUE_PREFIXES = ("amq.rabbitmq.reply-to", "amq.gen-")


async def send_reply(
    channel: AbstractChannel, message: AbstractIncomingMessage, reply: BaseModel
) -> None:
    """Answer a request on its `reply_to`, if it asked for an answer and names a reply
    queue: RabbitMQ's direct reply-to or a server-named (`amq.gen-`) queue. Replies go
    by amq.default, which reaches every queue: a `reply_to` naming a job queue or a log
    must not make the gateway write there for a stranger."""
    if not message.reply_to or not message.reply_to.startswith(REPLY_QUEUE_PREFIXES):
        if message.reply_to:
            log.warning("not replying to reply_to %r: not a reply queue", message.reply_to[:80])
        return
    await publish_body(
        channel.default_exchange,
        reply.model_dump_json(exclude_none=True).encode(),
        json_properties(correlation_id=message.correlation_id, persistent=False),
        routing_key=message.reply_to,
        mandatory=False,  # a requester that went away is not the job's problem
    )


Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


async def settle(message: AbstractIncomingMessage, handler: Handler) -> None:
    """Run `handler` and tell the broker the outcome; the one place that acks or rejects.

    - returns normally           → ack
    - DeadLetter                 → reject without requeue: the queue's dead-letter
      exchange keeps it (the handler has already emitted its event)
    - any other exception        → requeue; the quorum queue's delivery limit
      dead-letters a message that keeps failing
    - cancellation (shutdown)    → nothing: the broker redelivers it when the channel closes
    A handler may ack early itself (a job handed to the host's journal); then nothing
    more is said to the broker, whatever happens next. An answer lost with the channel
    is no error: the broker delivers the message again, and handlers are idempotent.
    """
    try:
        await handler(message)
    except DeadLetter as exc:
        if message.processed:
            log.error("message %s failed after it was acked: %s", message.message_id, exc)
            return
        log.info("dead-lettering message %s: %s", message.message_id, exc)
        await _answer(message, message.reject(requeue=False))
    except Exception:
        if message.processed:
            log.exception("message %s failed after it was acked", message.message_id)
            return
        log.exception("handler failed on message %s; requeueing", message.message_id)
        await _answer(message, message.nack(requeue=True))
    else:
        if not message.processed:  # a handler may ack early (see sandfleet.workers.job_runner)
            await _answer(message, message.ack())


async def _answer(message: AbstractIncomingMessage, answer: Awaitable[None]) -> None:
    try:
        await answer
    except BROKER_UNAVAILABLE as exc:
        log.warning("message %s: the broker did not hear its answer (%s)", message.message_id, exc)
