"""Jobs as the message bodies the gateway publishes, signed together: the jobs handed
over in one pass of the event loop (a batch's, as its `accepted` event is read back;
single submissions settled together) share one Ed25519 signature over a hash tree of
them (common.signature_trees), and a job alone is signed alone, as before.

Nothing waits to fill a tree: the jobs of a pass are signed at the end of it. One
signature a pass instead of one a job is most of what a batch's job costs the gateway
beyond its publish (README, Benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import logging

from sandfleet.common.models import Job
from sandfleet.common.signing import SIGNATURE_FIELD, JobSigner

log = logging.getLogger(__name__)


class JobNotSigned(Exception):
    """The job's pass could not be signed (the signer failed: its cause says why)."""


class JobsSignedTogether:
    """`await signing.body(job)`: `job`'s message body, signed (unsigned without a key).
    One job that cannot be signed (or serialised) fails every job of its pass."""

    def __init__(self, signer: JobSigner | None) -> None:
        self._signer = signer
        self._pending: list[tuple[Job, asyncio.Future[bytes]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def body(self, job: Job) -> bytes:
        if self._signer is None:
            return job.model_dump_json().encode()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a loop that is gone took its callers with it
            self._pending, self._loop = [], loop
        if not self._pending:
            loop.call_soon(self._sign_pending, self._signer)
        signed: asyncio.Future[bytes] = loop.create_future()
        self._pending.append((job, signed))
        return await signed

    def _sign_pending(self, signer: JobSigner) -> None:
        pending = [(job, signed) for job, signed in self._pending if not signed.done()]
        self._pending = []
        try:
            bodies = signed_bodies(signer, [job for job, _ in pending]) if pending else []
            for (_, signed), body in zip(pending, bodies, strict=True):
                signed.set_result(body)
        except Exception as exc:
            log.exception("%d jobs not signed", len(pending))
            for _, signed in pending:
                if not signed.done():
                    error = JobNotSigned(f"not signed: {exc!r}")
                    error.__cause__ = exc
                    signed.set_exception(error)


def signed_bodies(signer: JobSigner, jobs: list[Job]) -> list[bytes]:
    """`jobs` as message bodies, signed together."""
    # Exactly the JSON that is signed goes out: a worker verifies what it parses. No
    # NaN (pydantic would read it back as a number), no escaping of what is not ASCII.
    many = [job.model_dump(mode="json") for job in jobs]
    bodies = []
    for data, signature in zip(many, signer.sign_many(many), strict=True):
        data[SIGNATURE_FIELD] = signature.model_dump()
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        bodies.append(text.encode())
    return bodies
