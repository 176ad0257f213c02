"""Ed25519 signatures on what the gateway publishes to workers: jobs and cancellations.

The broker's permissions keep strangers off the job queues; a signature makes a job
that did not come from the gateway (a forged one, or one a misconfigured account let
through) worthless: workers verify before anything else and refuse what fails.

What is signed is the message's JSON object without its `signature` member, in one
canonical form (sorted keys, no spaces, ASCII), so a worker that re-publishes a job
(bound to its host, parked for GPUs) carries the gateway's signature along with it.
Gateway and workers must run the same sandfleet version: a field one side knows and
the other does not changes the canonical form.

Jobs signed together (a batch's, admitted in one pass) share one signature over a hash
tree of them, each carrying its proof (`sandfleet.common.signature_trees`); a job
signed alone carries a signature over itself, as before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from sandfleet.common.errors import SandfleetError
from sandfleet.common.signature_trees import (
    MAX_PROOF_STEPS,
    MAX_TREE_LEAVES,
    PROOF_STEP_PATTERN,
    SALT_BYTES,
    SALT_PATTERN,
    leaf_hash,
    root_of,
    signed_message,
    tree,
)

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_FIELD = "signature"
# A key file is a few hundred bytes; a cap keeps a wrong path from reading a huge file.
_MAX_KEY_FILE_BYTES = 16 << 10


class KeyFileError(SandfleetError):
    """A key file that cannot be used (missing, unreadable, not an Ed25519 PEM key)."""


ProofStep = Annotated[str, StringConstraints(pattern=PROOF_STEP_PATTERN)]


class Signature(BaseModel):
    """Who signed (`key_id`) and the signature, base64; for a message signed with others,
    its `salt` and its `proof`: the way from it to the signed root of their tree."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    value: str = Field(min_length=1, max_length=128)
    proof: list[ProofStep] | None = Field(default=None, min_length=1, max_length=MAX_PROOF_STEPS)
    salt: str | None = Field(default=None, pattern=SALT_PATTERN)

    @model_validator(mode="after")
    def _proof_and_salt_together(self) -> Signature:
        if (self.proof is None) != (self.salt is None):
            raise ValueError("a proof and its salt go together")
        return self

    @model_serializer(mode="wrap")
    def _absent_proof_left_out(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Left out, not null: a message signed alone reads as it always has.
        data = handler(self)
        if self.proof is None and isinstance(data, dict):
            data.pop("proof", None)
            data.pop("salt", None)
        return data


class SignatureInvalid(Exception):
    """Why a message's signature does not hold (missing, unknown key, wrong)."""


def canonical_bytes(data: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: `data` without its signature, in canonical JSON."""
    unsigned = {k: v for k, v in data.items() if k != SIGNATURE_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class JobSigner:
    """Signs messages with the gateway's private key (`SANDFLEET_SIGNING_KEY`)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path) -> JobSigner:
        try:
            key = serialization.load_pem_private_key(_read_key_file(path), password=None)
        except (ValueError, TypeError):
            raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 private key")
        return cls(key)

    def sign(self, data: Mapping[str, Any]) -> Signature:
        value = self._key.sign(canonical_bytes(data))
        return Signature(key_id=self.key_id, value=base64.b64encode(value).decode())

    def sign_many(self, many: Sequence[Mapping[str, Any]]) -> list[Signature]:
        """A signature for each of `many`: one over a tree of them (MAX_TREE_LEAVES at a
        time), each with its proof; a lone one signed as `sign` does."""
        signatures: list[Signature] = []
        for start in range(0, len(many), MAX_TREE_LEAVES):
            chunk = many[start : start + MAX_TREE_LEAVES]
            if len(chunk) == 1:
                signatures.append(self.sign(chunk[0]))
                continue
            salts = [secrets.token_bytes(SALT_BYTES) for _ in chunk]
            leaves = map(leaf_hash, salts, map(canonical_bytes, chunk))
            root, proofs = tree(list(leaves))
            value = base64.b64encode(self._key.sign(signed_message(root))).decode()
            signatures.extend(
                Signature(key_id=self.key_id, value=value, proof=proof, salt=salt.hex())
                for proof, salt in zip(proofs, salts, strict=True)
            )
        return signatures


class SignatureVerifier:
    """Checks signatures against the keys a worker trusts (`SANDFLEET_TRUSTED_KEYS`);
    several keys at once let the gateway's key be rotated without a stop."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(key): key for key in public_keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> SignatureVerifier:
        return cls(load_public_key(path) for path in paths)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def verify(self, data: Mapping[str, Any]) -> None:
        """SignatureInvalid unless `data` carries a good signature by a trusted key."""
        raw = data.get(SIGNATURE_FIELD)
        if raw is None:
            raise SignatureInvalid("the message is not signed")
        try:
            signature = Signature.model_validate(raw)
            value = base64.b64decode(signature.value, validate=True)
        except ValueError:
            raise SignatureInvalid("the signature is malformed") from None
        key = self._keys.get(signature.key_id)
        if key is None:
            raise SignatureInvalid(f"signed by key {signature.key_id}, which is not trusted here")
        signed = canonical_bytes(data)
        if signature.proof is not None and signature.salt is not None:
            leaf = leaf_hash(bytes.fromhex(signature.salt), signed)
            signed = signed_message(root_of(leaf, signature.proof))
        try:
            key.verify(value, signed)
        except InvalidSignature:
            raise SignatureInvalid(
                f"the signature by key {signature.key_id} does not match the message"
            ) from None


M = TypeVar("M", bound=BaseModel)


def signed(model: M, signer: JobSigner | None) -> M:
    """`model` with its `signature` set by `signer` (unchanged with no signer)."""
    if signer is None:
        return model
    signature = signer.sign(model.model_dump(mode="json"))
    return model.model_copy(update={SIGNATURE_FIELD: signature})


def generate_keys(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair: DIR/signing.key (0600, PEM PKCS#8) and DIR/signing.pub
    (PEM). An existing pair is never overwritten: rotating means a new directory."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return private_path, public_path


def _write_new(path: Path, content: bytes, mode: int) -> None:
    # O_EXCL|O_NOFOLLOW: never through a link planted where the key goes.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(content)


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            content = file.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    if len(content) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large for a key file")
    return content


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read_key_file(path))
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def trusted_key_files(spec: str) -> list[Path]:
    """`SANDFLEET_TRUSTED_KEYS`: comma-separated files or directories (every `*.pub` in a
    directory)."""
    files: list[Path] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path = Path(part)
        files.extend(sorted(path.glob("*.pub")) if path.is_dir() else [path])
    return files
