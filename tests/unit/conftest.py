"""Fixtures the unit tests share."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandfleet.common.signing import JobSigner, SignatureVerifier


@pytest.fixture
def signer() -> JobSigner:
    """A gateway's signer, with a key of its own."""
    return JobSigner(Ed25519PrivateKey.generate())


@pytest.fixture
def verifier(signer: JobSigner) -> SignatureVerifier:
    """A worker that trusts `signer`'s key."""
    return SignatureVerifier([signer._key.public_key()])
