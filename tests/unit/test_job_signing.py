"""The gateway's job signing: the jobs of one loop pass under one signature, each body
verifying as a worker reads it."""

from __future__ import annotations

import asyncio
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandfleet.common.models import Job, JobTemplate
from sandfleet.common.signing import JobSigner, Signature, SignatureVerifier
from sandfleet.gateway.job_signing import JobNotSigned, JobsSignedTogether


def a_job(i: int) -> Job:
    return Job(
        job_id=f"j-{i}",
        driver="docker",
        submitted_by="alice",
        template=JobTemplate(image="busybox", command=["echo", str(i)]),
    )


def checked(signer: JobSigner, body: bytes, job: Job) -> Signature:
    """`body` verified as a worker does, and parsed as `job` (what an unsigned body of it
    parses as) with a signature."""
    SignatureVerifier([signer._key.public_key()]).verify(json.loads(body))
    got = Job.model_validate_json(body)
    assert got.model_copy(update={"signature": None}) == Job.model_validate_json(
        job.model_dump_json()
    )
    assert got.signature is not None
    return got.signature


async def test_jobs_of_one_pass_share_a_signature_and_each_verifies(signer: JobSigner) -> None:
    signing = JobsSignedTogether(signer)
    jobs = [a_job(i) for i in range(5)]
    bodies = await asyncio.gather(*(signing.body(job) for job in jobs))
    signatures = [checked(signer, body, job) for body, job in zip(bodies, jobs, strict=True)]
    assert len({s.value for s in signatures}) == 1
    assert all(s.proof for s in signatures)
    lone = a_job(9)
    alone = checked(signer, await signing.body(lone), lone)  # a pass of its own
    assert alone.proof is None and alone.value != signatures[0].value


async def test_a_caller_gone_before_the_signing_leaves_the_others_signed(
    signer: JobSigner,
) -> None:
    signing = JobsSignedTogether(signer)
    jobs = [a_job(i) for i in range(3)]
    tasks = [asyncio.create_task(signing.body(job)) for job in jobs]
    await asyncio.sleep(0)  # each has handed its job over; none is signed yet
    tasks[1].cancel()
    async with asyncio.timeout(5):
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    for i in (0, 2):
        body = done[i]
        assert isinstance(body, bytes)
        assert checked(signer, body, jobs[i]).proof is not None


async def test_a_signer_that_fails_fails_every_caller_of_its_pass(signer: JobSigner) -> None:
    class Broken(JobSigner):
        def sign_many(self, many: object) -> list[Signature]:
            raise RuntimeError("no key")

    signing = JobsSignedTogether(Broken(Ed25519PrivateKey.generate()))
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(
            *(signing.body(a_job(i)) for i in range(3)), return_exceptions=True
        )
    assert [type(o) for o in outcomes] == [JobNotSigned] * 3
    assert all(
        isinstance(o, JobNotSigned) and isinstance(o.__cause__, RuntimeError) for o in outcomes
    )
    job = a_job(1)
    assert checked(signer, await JobsSignedTogether(signer).body(job), job)


async def test_text_that_is_not_ascii_travels_as_itself(signer: JobSigner) -> None:
    job = a_job(1).model_copy(update={"labels": {"team": "équipe 🚀"}})
    body = await JobsSignedTogether(signer).body(job)
    assert "équipe 🚀".encode() in body
    checked(signer, body, job)


async def test_without_a_key_a_job_goes_unsigned() -> None:
    job = a_job(1)
    body = await JobsSignedTogether(None).body(job)
    assert body == job.model_dump_json().encode() and b'"signature":null' in body
