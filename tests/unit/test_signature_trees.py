"""Jobs signed together under one signature over a hash tree: each verifies alone, and
nothing in a job or its proof can change without the signature failing."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest

from sandfleet.common import signing
from sandfleet.common.models import Job, JobTemplate
from sandfleet.common.signature_trees import leaf_hash, root_of, signed_message, tree
from sandfleet.common.signing import (
    SIGNATURE_FIELD,
    JobSigner,
    SignatureInvalid,
    SignatureVerifier,
)


def jobs(n: int) -> list[dict[str, Any]]:
    """`n` jobs as a worker reads them off the queue, before signing."""
    return [
        json.loads(
            Job(
                job_id=f"j-{i}",
                driver="docker",
                submitted_by="alice",
                template=JobTemplate(image="busybox", command=["echo", str(i), "hé"]),
            ).model_dump_json()
        )
        for i in range(n)
    ]


def signed_together(signer: JobSigner, n: int) -> list[dict[str, Any]]:
    many = jobs(n)
    for data, signature in zip(many, signer.sign_many(many), strict=True):
        data[SIGNATURE_FIELD] = signature.model_dump()
    return [json.loads(json.dumps(data)) for data in many]  # through the wire


@pytest.mark.parametrize("n", [2, 3, 5, 8, 100])
def test_each_job_signed_together_verifies_alone_under_one_signature(
    signer: JobSigner, verifier: SignatureVerifier, n: int
) -> None:
    many = signed_together(signer, n)
    for data in many:
        verifier.verify(data)
        # re-published by a worker (bound to its host, parked): parsed, dumped, still good
        verifier.verify(json.loads(Job.model_validate_json(json.dumps(data)).model_dump_json()))
    signatures = [data[SIGNATURE_FIELD] for data in many]
    assert len({s["value"] for s in signatures}) == 1
    assert max(len(s["proof"]) for s in signatures) == math.ceil(math.log2(n))


def test_a_job_signed_alone_carries_no_proof_as_before(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    [data] = signed_together(signer, 1)
    assert set(data[SIGNATURE_FIELD]) == {"key_id", "value"}
    verifier.verify(data)


def test_a_change_to_any_job_signed_together_breaks_its_signature(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    for field, value in [("job_id", "j-other"), ("submitted_by", "mallory"), ("driver", "vm")]:
        many = signed_together(signer, 5)
        many[3][field] = value
        with pytest.raises(SignatureInvalid, match="does not match"):
            verifier.verify(many[3])


def test_a_proof_moved_changed_or_dropped_breaks_the_signature(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    many = signed_together(signer, 8)
    proof_of = [list(data[SIGNATURE_FIELD]["proof"]) for data in many]
    first, *rest = proof_of[0]
    flipped = ("r" if first[0] == "l" else "l") + first[1:]
    changed = first[:-1] + ("0" if first[-1] != "0" else "1")
    bad_proofs = {
        "another job's": proof_of[1],
        "one side flipped": [flipped, *rest],
        "a step short": proof_of[0][:-1],
        "a step more": [*proof_of[0], "l" + "0" * 64],
        "a hash changed": [changed, *rest],
    }
    for why, proof in bad_proofs.items():
        data = dict(many[0])
        data[SIGNATURE_FIELD] = {**many[0][SIGNATURE_FIELD], "proof": proof}
        with pytest.raises(SignatureInvalid, match="does not match"):
            verifier.verify(data)
        assert why


def test_a_tree_signature_and_a_lone_one_never_stand_for_each_other(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    many = signed_together(signer, 2)
    without = dict(many[0])
    without[SIGNATURE_FIELD] = {
        k: v for k, v in many[0][SIGNATURE_FIELD].items() if k not in ("proof", "salt")
    }
    with pytest.raises(SignatureInvalid, match="does not match"):
        verifier.verify(without)
    [alone] = signed_together(signer, 1)
    other = signed_together(signer, 2)[1]
    tree_part = {k: other[SIGNATURE_FIELD][k] for k in ("proof", "salt")}
    alone[SIGNATURE_FIELD] = {**alone[SIGNATURE_FIELD], **tree_part}
    with pytest.raises(SignatureInvalid, match="does not match"):
        verifier.verify(alone)


@pytest.mark.parametrize(
    "proof",
    [
        [],
        ["x" + "0" * 64],
        ["l" + "0" * 63],
        ["l" + "G" * 64],
        ["l" + "0" * 64] * 13,
        "l" + "0" * 64,
    ],
)
def test_a_malformed_or_overlong_proof_is_refused_before_any_hashing(
    signer: JobSigner, verifier: SignatureVerifier, proof: object
) -> None:
    [data] = signed_together(signer, 1)
    data[SIGNATURE_FIELD] = {**data[SIGNATURE_FIELD], "proof": proof}
    with pytest.raises(SignatureInvalid, match="malformed"):
        verifier.verify(data)


@pytest.mark.parametrize(
    "change",
    [{"salt": None}, {"salt": "0" * 31}, {"salt": "Z" * 32}, {"proof": None}, {"salt": 7}],
)
def test_a_proof_without_its_salt_or_a_salt_malformed_is_refused(
    signer: JobSigner, verifier: SignatureVerifier, change: dict[str, Any]
) -> None:
    [data, _] = signed_together(signer, 2)
    signature = {**data[SIGNATURE_FIELD], **change}
    data[SIGNATURE_FIELD] = {k: v for k, v in signature.items() if v is not None}
    with pytest.raises(SignatureInvalid, match="malformed"):
        verifier.verify(data)


def test_each_job_has_a_salt_of_its_own_and_anothers_breaks_it(
    signer: JobSigner, verifier: SignatureVerifier
) -> None:
    many = signed_together(signer, 4)
    salts = [data[SIGNATURE_FIELD]["salt"] for data in many]
    assert len(set(salts)) == 4 and all(len(salt) == 32 for salt in salts)
    many[0][SIGNATURE_FIELD] = {**many[0][SIGNATURE_FIELD], "salt": salts[1]}
    with pytest.raises(SignatureInvalid, match="does not match"):
        verifier.verify(many[0])


def test_the_tree_is_built_as_documented() -> None:
    """A known answer, from hashlib alone: the wire format workers of every release
    that reads trees agree on."""
    salts, jobs_ = [bytes([i]) * 16 for i in range(3)], [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    leaves = [hashlib.sha256(b"\x00" + s + j).digest() for s, j in zip(salts, jobs_, strict=True)]
    assert [leaf_hash(s, j) for s, j in zip(salts, jobs_, strict=True)] == leaves
    left = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
    root = hashlib.sha256(b"\x01" + left + leaves[2]).digest()
    assert tree(leaves) == (
        root,
        [
            ["r" + leaves[1].hex(), "r" + leaves[2].hex()],
            ["l" + leaves[0].hex(), "r" + leaves[2].hex()],
            ["l" + left.hex()],  # the odd one out moved up unhashed: one step
        ],
    )
    assert signed_message(root) == b"sandfleet job tree v1\x00" + root


def test_more_jobs_than_a_tree_holds_go_in_several(
    signer: JobSigner, verifier: SignatureVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(signing, "MAX_TREE_LEAVES", 4)
    many = signed_together(signer, 9)
    for data in many:
        verifier.verify(data)
    values = [data[SIGNATURE_FIELD]["value"] for data in many]
    assert [len(set(values[i : i + 4])) for i in (0, 4)] == [1, 1]
    assert len(set(values)) == 3
    assert "proof" not in many[8][SIGNATURE_FIELD]  # alone in its tree


def test_every_leaf_folds_to_the_root_and_an_odd_one_out_moves_up_unhashed() -> None:
    leaves = [leaf_hash(b"salt", bytes([i])) for i in range(7)]
    root, proofs = tree(leaves)
    assert all(root_of(leaf, proof) == root for leaf, proof in zip(leaves, proofs, strict=True))
    assert [len(p) for p in proofs] == [3, 3, 3, 3, 3, 3, 2]
    assert tree(leaves[:1]) == (leaves[0], [[]])
    with pytest.raises(ValueError, match="1 to"):
        tree([])
