"""Job signatures: what verifies, and every way a message fails to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandfleet.common.models import CancelRequest, Job, JobTemplate
from sandfleet.common.signing import (
    JobSigner,
    KeyFileError,
    SignatureInvalid,
    SignatureVerifier,
    generate_keys,
    signed,
    trusted_key_files,
)


def a_job(**changes: object) -> Job:
    job = Job(
        job_id="j-1",
        driver="docker",
        submitted_by="alice",
        template=JobTemplate(image="busybox", command=["echo", "hé"], environment={"K": "v"}),
    )
    return job.model_copy(update=changes)


def wire(job: Job) -> dict[str, object]:
    """The job as a worker reads it off the queue."""
    data: dict[str, object] = json.loads(job.model_dump_json())
    return data


def test_a_signed_job_verifies_as_the_worker_reads_it(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    job = signed(a_job(), signer)
    assert job.signature is not None and job.signature.key_id == signer.key_id
    verifier.verify(wire(job))
    # re-published by a worker (bound to its host, parked): parsed, dumped, still good
    verifier.verify(wire(Job.model_validate_json(job.model_dump_json())))


@pytest.mark.parametrize(
    "change",
    [
        {"job_id": "j-2"},
        {"submitted_by": "mallory"},
        {"driver": "podman"},
        {"template": JobTemplate(image="evil", command=["echo", "hé"], environment={"K": "v"})},
    ],
)
def test_any_change_after_signing_breaks_the_signature(
    signer: JobSigner, verifier: SignatureVerifier, change: dict[str, object]
) -> None:
    tampered = signed(a_job(), signer).model_copy(update=change)
    with pytest.raises(SignatureInvalid, match="does not match"):
        verifier.verify(wire(tampered))


def test_unsigned_malformed_and_untrusted_signatures_fail(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    with pytest.raises(SignatureInvalid, match="not signed"):
        verifier.verify(wire(a_job()))
    stranger = JobSigner(Ed25519PrivateKey.generate())
    with pytest.raises(SignatureInvalid, match="not trusted"):
        verifier.verify(wire(signed(a_job(), stranger)))
    data = wire(signed(a_job(), signer))
    data["signature"] = {"key_id": signer.key_id, "value": "!!not base64!!"}
    with pytest.raises(SignatureInvalid, match="malformed"):
        verifier.verify(data)
    data["signature"] = "a string"
    with pytest.raises(SignatureInvalid, match="malformed"):
        verifier.verify(data)


def test_several_trusted_keys_let_the_gateway_key_rotate(signer: JobSigner) -> None:
    new = JobSigner(Ed25519PrivateKey.generate())
    both = SignatureVerifier([signer._key.public_key(), new._key.public_key()])
    both.verify(wire(signed(a_job(), signer)))
    both.verify(wire(signed(a_job(), new)))
    assert both.key_ids == sorted([signer.key_id, new.key_id])


def test_cancellations_are_signed_the_same_way(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    request = signed(CancelRequest(job_id="j-1", requested_by="alice"), signer)
    verifier.verify(json.loads(request.model_dump_json()))
    forged = request.model_copy(update={"job_id": "someone-elses"})
    with pytest.raises(SignatureInvalid):
        verifier.verify(json.loads(forged.model_dump_json()))


def test_generated_keys_are_private_load_and_are_never_overwritten(tmp_path: Path) -> None:
    private, public = generate_keys(tmp_path / "keys")
    assert (private.stat().st_mode & 0o777, (tmp_path / "keys").stat().st_mode & 0o777) == (
        0o600,
        0o700,
    )
    signer = JobSigner.from_file(private)
    SignatureVerifier.from_files([public]).verify(wire(signed(a_job(), signer)))
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path / "keys")


def test_a_link_planted_where_a_key_goes_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "keys").mkdir()
    os.symlink(victim, tmp_path / "keys" / "signing.key")
    with pytest.raises(FileExistsError):
        generate_keys(tmp_path / "keys")
    assert victim.read_text() == "untouched"


def test_unusable_key_files_are_named(tmp_path: Path) -> None:
    _, public = generate_keys(tmp_path / "k")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        JobSigner.from_file(public)
    with pytest.raises(KeyFileError, match="No such file"):
        JobSigner.from_file(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        SignatureVerifier.from_files([tmp_path / "k" / "signing.key"])
    huge = tmp_path / "huge.pub"
    huge.write_bytes(b"x" * (1 << 20))
    with pytest.raises(KeyFileError, match="too large"):
        SignatureVerifier.from_files([huge])


def test_trusted_keys_name_files_and_directories(tmp_path: Path) -> None:
    _, first = generate_keys(tmp_path / "a")
    _, second = generate_keys(tmp_path / "b")
    assert trusted_key_files(f"{first}, {tmp_path / 'b'}") == [first, second]
    assert trusted_key_files("") == []
