"""Submissions for fuzzing the gateway, from a seeded `random.Random`: near-valid requests,
then mutated as a hostile client would (wrong types, out-of-range numbers, giant integers,
deep nesting, huge strings, odd unicode, unknown keys; byte flips, splices, truncation).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

GIANT_DIGITS = 5000  # past the 4,300-digit limit on int() from text

# Values a field may be swapped for: each breaks some rule, or sits right at a bound.
HOSTILE_VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: None,
    lambda r: r.choice([True, False]),
    lambda r: r.choice([0, -1, 1, 63, 64, 65, 2**31, 2**63, -(2**63)]),
    lambda r: r.choice([0.0, -0.0, 1e-10, 0.01, 0.0099999, 1024.0, 1024.0001, 1e308, 5e-324]),
    lambda r: r.choice([604800, 604801, 10**20, 7 * 86400 - 1, 6 * 2**20 - 1, 16 * 2**40 + 1]),
    lambda r: r.choice(["", " ", "x", "a b", "sandfleet.x", "-lead", "A" * 64, "\x00", "é"]),
    lambda r: r.choice(["500m", "10m", "9m", "6Mi", "16Ti", "16.0000001Ti", "1e400Gi", "5Mi"]),
    lambda r: r.choice(["\U0001f600", "\u202e", "\ufeff", "\u0661\u0662", "6Mi\n", " 2 "]),
    lambda r: "x" * r.choice([256, 257, 512, 513, 70_000]),
    lambda r: [r.choice([0, "a", None])] * r.choice([1, 1025]),
    lambda r: {r.choice(["a", "1a", "sandfleet.k", "", "A_1"]): r.choice(["v", 1, None])},
    lambda r: "9" * r.choice([19, 400, 4300]) + r.choice(["", "Gi", "m"]),
]

REQUEST_PATHS: list[tuple[str, ...]] = [
    ("job_id",), ("driver",), ("placement",), ("placement", "host"), ("labels",),
    ("resource_requirements",), ("resource_requirements", "cpu"),
    ("resource_requirements", "memory"), ("resource_requirements", "gpu"),
    ("resource_requirements", "gpu", "count"), ("template",), ("template", "image"),
    ("template", "command"), ("template", "environment"), ("template", "labels"),
    ("template", "timeout_seconds"), ("template", "driver_config"),
    ("template", "driver_config", "docker"), ("template", "driver_config", "vm"),
    ("colour",), ("template", "extra"), ("resource_requirements", "gpu", "kind"),
]  # fmt: skip


def valid_request(rng: random.Random) -> dict[str, Any]:
    """A request every rule allows, with a random share of the optional fields."""
    template: dict[str, Any] = {"image": rng.choice(["busybox", "/var/lib/k", "r/i:1"])}
    request: dict[str, Any] = {"template": template}
    optional: list[tuple[dict[str, Any], str, Callable[[], Any]]] = [
        (request, "job_id", lambda: f"j-{rng.randrange(10**6)}"),
        (request, "driver", lambda: rng.choice(["docker", "podman", "vm", "k8s"])),
        (request, "placement", lambda: {"host": rng.choice(["gpu-01", "h1", None])}),
        (request, "labels", lambda: {"team": "ml", "x.y/z": ""}),
        (request, "resource_requirements", lambda: _resources(rng)),
        (template, "command", lambda: ["sh", "-c", "echo hi"]),
        (template, "environment", lambda: {"K": "V", "_X1": "é"}),
        (template, "labels", lambda: {"component": "trainer"}),
        (template, "timeout_seconds", lambda: rng.choice([1, 3600, 604800])),
        (template, "driver_config", lambda: {"docker": {"gpu_device_ids": ["a=0"]}, "vm": 3}),
    ]
    for target, key, value in optional:
        if rng.random() < 0.4:
            target[key] = value()
    return request


def _resources(rng: random.Random) -> dict[str, Any]:
    return {
        "cpu": rng.choice([0.01, 0.5, 2, 1024, "500m", "10m", "1.5", None]),
        "memory": rng.choice([6 * 2**20, "512Mi", "4Gi", "1G", "16Ti", " 64Mi ", None]),
        "gpu": {"count": rng.choice([1, 8, 64, None])},
    }


def mutated_request(rng: random.Random, request: dict[str, Any]) -> Any:
    """`request` with one to three fields set to hostile values, or the whole replaced."""
    if rng.random() < 0.03:
        return rng.choice([[], "x", 1, None, [request], _nested(rng, rng.choice([150, 300]))])
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(REQUEST_PATHS)
        _set(request, path, rng.choice(HOSTILE_VALUES)(rng))
    return request


def _set(request: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = request
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def _nested(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice([1, "x", None])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def mutated_bytes(rng: random.Random, body: bytes) -> bytes:
    """`body` with one byte-level mutation: the kind a broken or hostile client sends."""
    at = rng.randrange(len(body) + 1)
    mutations: list[Callable[[], bytes]] = [
        lambda: body[:at] + bytes([rng.randrange(256)]) + body[at + 1 :],
        lambda: body[:at] + body[at + 1 :],
        lambda: body[:at],
        lambda: body[:at] + body[at:][: rng.randrange(64)] * 2 + body[at:],
        lambda: body[:at] + b"9" * GIANT_DIGITS + body[at:],
        lambda: body.replace(b"1", b"1" + b"0" * rng.choice([10, 400, GIANT_DIGITS]), 1),
        lambda: body.replace(b'"', b'"\\ud800', 1),
        lambda: body[:at] + rng.choice([b"NaN", b"Infinity", b"-0", b"1e400", b"\xff"]) + body[at:],
        lambda: b"[" * rng.choice([100, 1000, 100_000]) + body,
        lambda: body.replace(b"}", b', "template": {"image": "dup"}}', 1),
        lambda: b"\xef\xbb\xbf" + body,
        lambda: body.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"),
        lambda: body + b"\x00",
    ]
    return rng.choice(mutations)()


def submission(rng: random.Random) -> bytes:
    """One submission: a valid request, a mutated one, or a mutated one's bytes mutated."""
    request = valid_request(rng)
    roll = rng.random()
    if roll < 0.15:
        return json.dumps(request).encode()
    data = mutated_request(rng, request)
    body = json.dumps(data, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    return mutated_bytes(rng, body) if roll > 0.6 else body


def hostile_request(size: int = 1 << 20, *, job_id: str = "hostile") -> bytes:
    """A request of `size` bytes breaking some 200,000 rules: each ~10-byte environment
    entry `"123": 0` breaks two (its name and its value), each error some 60 bytes."""
    environment: dict[str, int] = {}
    raw = b""
    while len(raw) < size - 100_000:
        environment |= {str(i): 0 for i in range(len(environment), len(environment) + 10_000)}
        request = {"job_id": job_id, "template": {"image": "x", "environment": environment}}
        raw = json.dumps(request).encode()
    return raw + b" " * (size - len(raw))
