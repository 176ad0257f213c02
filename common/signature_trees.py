"""Many jobs under one Ed25519 signature: a hash tree over them, its root signed.

A gateway admitting a batch signs a hundred jobs at once, and an Ed25519 signature costs
more CPU than the rest of a job's admission bar its publish. So jobs signed together
are the leaves of a SHA-256 tree (as in RFC 6962 and RFC 9162), the gateway signs its
root once, and each job carries its *proof*: the sibling hashes from its leaf up to the
root, each marked with the side it joins on. A worker hashes the job it received,
folds the proof into a root, and verifies the signature on that root, so every job
stands alone as before: a changed byte in any job, or a proof taken from another job,
yields another root.

- A leaf is `SHA-256(0x00 ‖ salt ‖ canonical job)`, an inner node `SHA-256(0x01 ‖ left
  ‖ right)`: no inner node can pass for a job (RFC 6962's second-preimage guard).
- Each job's salt (SALT_BYTES random bytes) travels only inside that job's message. A
  proof shows its reader the leaf hashes of other jobs (other submitters', other
  hosts'), and without their salts a hash confirms no guess of what a job holds.
- What is signed is `TREE_CONTEXT ‖ root`: it starts with bytes no canonical JSON
  object does (`{`), so a root's signature is never a job's, nor the other way round.
- A level's odd node out moves up unhashed; its proof has no step for that level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

TREE_CONTEXT = b"sandfleet job tree v1\x00"
# Leaves under one root: a proof holds at most log2 of it steps (12), and a worker
# refuses a longer one (MAX_PROOF_STEPS) before hashing anything.
MAX_TREE_LEAVES = 4096
MAX_PROOF_STEPS = 12
PROOF_STEP_PATTERN = r"^[lr][0-9a-f]{64}$"  # the sibling's side, then its hash
SALT_BYTES = 16
SALT_PATTERN = rf"^[0-9a-f]{{{2 * SALT_BYTES}}}$"
_LEAF, _NODE = b"\x00", b"\x01"


def leaf_hash(salt: bytes, canonical: bytes) -> bytes:
    return hashlib.sha256(_LEAF + salt + canonical).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def signed_message(root: bytes) -> bytes:
    """The bytes whose signature vouches for every leaf under `root`."""
    return TREE_CONTEXT + root


def tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[str]]]:
    """The root over `leaves` (1 to MAX_TREE_LEAVES leaf hashes), and each leaf's proof."""
    if not 1 <= len(leaves) <= MAX_TREE_LEAVES:
        raise ValueError(f"a tree has 1 to {MAX_TREE_LEAVES} leaves, not {len(leaves)}")
    proofs: list[list[str]] = [[] for _ in leaves]
    level = list(leaves)
    under = [[i] for i in range(len(leaves))]  # the leaves below each node of the level
    while len(level) > 1:
        parents, parents_under = [], []
        for i in range(0, len(level) - 1, 2):
            left, right = level[i], level[i + 1]
            for leaf in under[i]:
                proofs[leaf].append("r" + right.hex())
            for leaf in under[i + 1]:
                proofs[leaf].append("l" + left.hex())
            parents.append(_node_hash(left, right))
            parents_under.append(under[i] + under[i + 1])
        if len(level) % 2:
            parents.append(level[-1])
            parents_under.append(under[-1])
        level, under = parents, parents_under
    return level[0], proofs


def root_of(leaf: bytes, proof: Sequence[str]) -> bytes:
    """The root that `proof` (steps as PROOF_STEP_PATTERN) leads to from `leaf`."""
    node = leaf
    for step in proof:
        sibling = bytes.fromhex(step[1:])
        node = _node_hash(sibling, node) if step[0] == "l" else _node_hash(node, sibling)
    return node
