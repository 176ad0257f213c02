"""The first thing a worker does with a delivered job: check that the gateway signed it.

A job that is not signed by a key this worker trusts, or is signed for another host,
never reaches the runner: no GPU is claimed, no journal entry written, no image
pulled. It is answered with a `rejected` event (reason `BadSignature`, or `WrongHost`)
that names no job (its job_id is exactly what cannot be trusted, and a `rejected`
under a real job's id would end that job in its watchers' eyes), and dead-lettered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from sandfleet.common.amqp import EventSink
from sandfleet.common.errors import DeadLetter, SandfleetError
from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.common.signing import SignatureInvalid, SignatureVerifier, trusted_key_files
from sandfleet.workers.identity import WorkerIdentity
from sandfleet.workers.job_check import JobMessage

log = logging.getLogger(__name__)

BAD_SIGNATURE = "BadSignature"
WRONG_HOST = "WrongHost"


class UnsignedJobsRefused(SandfleetError):
    """A worker was started with no trusted keys and without allowing unsigned jobs."""


def job_verifier(settings: Settings) -> SignatureVerifier | None:
    """The keys this worker trusts; None when it runs unsigned jobs (allowed explicitly).
    UnsignedJobsRefused when no keys are set and unsigned jobs are not allowed."""
    files = trusted_key_files(settings.trusted_keys)
    if not files:
        if settings.allow_unsigned_jobs:
            return None  # said once connected: SignedJobsOnly.say_what_runs
        raise UnsignedJobsRefused(
            "no trusted keys: set SANDFLEET_TRUSTED_KEYS to the gateway's public key "
            "(`sandfleet keys generate DIR` makes a pair; DIR/signing.pub), or set "
            "SANDFLEET_ALLOW_UNSIGNED_JOBS=1 to run jobs nobody signed"
        )
    missing = [str(path) for path in files if not Path(path).is_file()]
    if missing:
        raise UnsignedJobsRefused(f"SANDFLEET_TRUSTED_KEYS names no such file: {missing}")
    return SignatureVerifier.from_files(files)


Handler = Callable[[JobMessage], Awaitable[None]]


class SignedJobsOnly:
    """Wraps the runner's delivery handler; a job failing the check never reaches it."""

    def __init__(
        self,
        verifier: SignatureVerifier | None,
        handler: Handler,
        *,
        identity: WorkerIdentity,
        events: EventSink,
    ) -> None:
        self._verifier = verifier
        self._handler = handler
        self._identity = identity
        self._events = events

    def say_what_runs(self) -> None:
        if self._verifier is None:
            log.warning("SANDFLEET_ALLOW_UNSIGNED_JOBS: this worker runs jobs nobody signed")
        else:
            log.info("running jobs signed by key(s) %s", ", ".join(self._verifier.key_ids))

    async def __call__(self, message: JobMessage) -> None:
        if self._verifier is not None:
            await self._check(self._verifier, message)
        await self._handler(message)

    async def _check(self, verifier: SignatureVerifier, message: JobMessage) -> None:
        try:
            data = json.loads(message.body)
            if not isinstance(data, dict):
                raise SignatureInvalid("the message is not a JSON object")
            verifier.verify(data)
        except (ValueError, RecursionError, SignatureInvalid) as exc:
            why = str(exc) if isinstance(exc, SignatureInvalid) else "the message is not JSON"
            await self._refuse(message, why)
            raise DeadLetter(f"job message refused: {why}") from None
        placed = data.get("placement")
        host = placed.get("host") if isinstance(placed, dict) else None
        if host is not None and host != self._identity.host:
            # Signed, but for another host: a copy someone re-published into this host's
            # queue. The job runs where the gateway placed it, and this copy says nothing
            # under its id.
            why = f"the job is placed on host {str(host)[:64]!r}, not this one"
            await self._refuse(message, why, reason=WRONG_HOST)
            raise DeadLetter(f"job message refused: {why}")

    async def _refuse(self, message: JobMessage, why: str, *, reason: str = BAD_SIGNATURE) -> None:
        claimed = (message.message_id or "")[:64]
        log.warning("refused a job message (claims id %r): %s", claimed, why)
        text = f"a job message (claiming id {claimed!r}) was refused: {why}"
        await self._events.publish(self._identity.event(None, Phase.REJECTED, reason, message=text))
