"""The gateway's job signing: the jobs of one loop pass under one signature, each body
verifying as a worker reads it."""

from __future__ import annotations

import asyncio
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandfleet.common.models import Job, JobTemplate
from sandfleet.common.signing import JobSigner, Signature, SignatureVerifier
from sandfleet.gateway.job_signing import JobsSignedTogether


def a_job(i: int) -> Job:
    return Job(
        job_id=f"j-{i}",
        driver="docker",
        submitted_by="alice",
        template=JobTemplate(image="busybox", command=["echo", str(i)]),
    )


def checked(signer: JobSigner, body: bytes, i: int) -> Signature:
    """`body` verified as a worker does, and parsed as the job it should be."""
    SignatureVerifier([signer._key.public_key()]).verify(json.loads(body))
    job = Job.model_validate_json(body)
    assert job.job_id == f"j-{i}" and job.template.command == ["echo", str(i)]
    assert job.signature is not None
    return job.signature


async def test_jobs_of_one_pass_share_a_signature_and_each_verifies(signer: JobSigner) -> None:
    signing = JobsSignedTogether(signer)
    bodies = await asyncio.gather(*(signing.body(a_job(i)) for i in range(5)))
    signatures = [checked(signer, body, i) for i, body in enumerate(bodies)]
    assert len({s.value for s in signatures}) == 1
    assert all(s.proof for s in signatures)
    alone = checked(signer, await signing.body(a_job(9)), 9)  # a pass of its own
    assert alone.proof is None and alone.value != signatures[0].value


async def test_a_caller_gone_before_the_signing_leaves_the_others_signed(
    signer: JobSigner,
) -> None:
    signing = JobsSignedTogether(signer)
    tasks = [asyncio.create_task(signing.body(a_job(i))) for i in range(3)]
    await asyncio.sleep(0)  # each has handed its job over; none is signed yet
    tasks[1].cancel()
    async with asyncio.timeout(5):
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    for i in (0, 2):
        body = done[i]
        assert isinstance(body, bytes)
        assert checked(signer, body, i).proof is not None


async def test_a_signer_that_fails_fails_every_caller_of_its_pass(signer: JobSigner) -> None:
    class Broken(JobSigner):
        def sign_many(self, many: object) -> list[Signature]:
            raise RuntimeError("no key")

    signing = JobsSignedTogether(Broken(Ed25519PrivateKey.generate()))
    outcomes = await asyncio.gather(
        *(signing.body(a_job(i)) for i in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [RuntimeError] * 3
    assert checked(signer, await JobsSignedTogether(signer).body(a_job(1)), 1)


async def test_without_a_key_a_job_goes_unsigned() -> None:
    job = a_job(1)
    body = await JobsSignedTogether(None).body(job)
    assert body == job.model_dump_json().encode() and b'"signature":null' in body
