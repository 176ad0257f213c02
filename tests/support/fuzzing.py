"""Fuzzing the gateway's front door in-process: generated and mutated submissions through
`decode` + `admit`, as `Gateway._handle` runs them, each outcome checked.

- every input ends accepted, or refused with MessageUndecodable / RequestInvalid; any
  other exception is *uncaught* (at the gateway: a requeued, redelivered poison message);
- a refusal renders as the gateway sends it (event and reply), small whatever the input;
- an accepted job satisfies every rule, judged by `violations`: an oracle written here
  from the README's rules, on json.loads' reading of the bytes, sharing no code with the
  pydantic models; and the job's message reads back as the same job on a worker.

`bench/fuzz.py` runs 100,000 of these; tests run small rounds through the same code.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from typing import Any

from sandfleet.common.amqp import job_message
from sandfleet.common.errors import FieldError, MessageUndecodable, RequestInvalid, bounded_errors
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import Job, ReplyStatus, SubmitReply
from sandfleet.common.settings import Settings
from sandfleet.gateway.envelope import admit, decode, job_id_hint, new_job_id
from tests.support.fuzz_inputs import submission

# What a rejected event and its reply may weigh, whatever the submission.
MAX_REJECTED_EVENT_BYTES = 8 << 10
MAX_REPLY_BYTES = 4 << 10

# ---- the oracle: the rules as the README states them ---------------------------------

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DRIVER = re.compile(r"[a-z][a-z0-9_]{0,31}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUANTITY = re.compile(
    r"[ \t\n\r\f\v]*([0-9]+(?:\.[0-9]+)?)[ \t\n\r\f\v]*([A-Za-z]*)[ \t\n\r\f\v]*"
)
_MEMORY_SCALE: dict[str, int | Decimal] = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
}
_MEMORY_SCALE |= {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
MEMORY_RANGE = (6 * 1024**2, 16 * 1024**4)
CPU_RANGE = (Decimal("0.01"), Decimal(1024))
_WIDE = Context(prec=200, Emax=MAX_EMAX, Emin=MIN_EMIN)  # a megabyte of digits fits

_REQUEST_KEYS = {"job_id", "driver", "placement", "labels", "resource_requirements", "template"}
_TEMPLATE_KEYS = {"image", "command", "environment", "labels", "timeout_seconds", "driver_config"}


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_str_map(value: Any, key_ok: Callable[[str], bool]) -> bool:
    return isinstance(value, dict) and all(
        key_ok(k) and isinstance(v, str) for k, v in value.items()
    )


def _label_key_ok(key: str) -> bool:
    return 1 <= len(key) <= 256 and not key.startswith("sandfleet.")


def _env_name_ok(key: str) -> bool:
    return len(key) <= 256 and _ENV_NAME.fullmatch(key) is not None


def quantity(text: str, scales: dict[str, int | Decimal]) -> Decimal | None:
    """`text` as an exact amount under `scales`' units, or None when it is not one."""
    match = _QUANTITY.fullmatch(text)
    if match is None or match.group(2) not in scales:
        return None
    return _WIDE.multiply(Decimal(match.group(1)), scales[match.group(2)])


def expected_memory(value: Any) -> int | None:
    """The byte count a valid `memory` means; None when the value breaks a rule."""
    if _is_int(value):
        amount: Decimal | None = Decimal(value)
    elif isinstance(value, str):
        amount = quantity(value, _MEMORY_SCALE)
    else:
        return None
    if amount is None or not MEMORY_RANGE[0] <= amount <= MEMORY_RANGE[1]:
        return None
    return int(amount)


def expected_cpu(value: Any) -> float | None:
    """The cores a valid `cpu` means; None when the value breaks a rule."""
    if _is_int(value):
        amount: Decimal | None = Decimal(value)
    elif type(value) is float:
        amount = Decimal(repr(value)) if math.isfinite(value) else None
    elif isinstance(value, str):
        amount = quantity(value, {"": 1, "m": Decimal("0.001")})
    else:
        return None
    if amount is None or not CPU_RANGE[0] <= amount <= CPU_RANGE[1]:
        return None
    return float(amount)


def _template_violations(template: Any, settings: Settings, driver: str) -> list[str]:
    if not isinstance(template, dict):
        return ["template is not an object"]
    wrong = [f"template.{k} is unknown" for k in set(template) - _TEMPLATE_KEYS]
    image = template.get("image")
    if not (isinstance(image, str) and 1 <= len(image) <= 512):
        wrong.append("template.image")
    command = template.get("command", [])
    if not (isinstance(command, list) and len(command) <= 1024):
        wrong.append("template.command")
    elif not all(isinstance(c, str) for c in command):
        wrong.append("template.command item")
    if not _is_str_map(template.get("environment", {}), _env_name_ok):
        wrong.append("template.environment")
    if not _is_str_map(template.get("labels", {}), _label_key_ok):
        wrong.append("template.labels")
    timeout = template.get("timeout_seconds")
    if timeout is not None and not (
        _is_int(timeout) and 0 < timeout <= settings.max_timeout_seconds
    ):
        wrong.append("template.timeout_seconds")
    return wrong + _driver_config_violations(template.get("driver_config", {}), settings, driver)


def _driver_config_violations(config: Any, settings: Settings, driver: str) -> list[str]:
    if not isinstance(config, dict):
        return ["template.driver_config is not an object"]
    size = len(json.dumps(config, separators=(",", ":")).encode())
    if size > settings.max_driver_config_bytes:
        return ["template.driver_config is too big"]
    if not isinstance(config.get(driver, {}), dict):
        return [f"template.driver_config.{driver} is not an object"]
    return []


def _resource_violations(resources: Any) -> list[str]:
    if not isinstance(resources, dict):
        return ["resource_requirements is not an object"]
    wrong = [f"resource_requirements.{k}" for k in set(resources) - {"cpu", "memory", "gpu"}]
    cpu, memory = resources.get("cpu"), resources.get("memory")
    if cpu is not None and expected_cpu(cpu) is None:
        wrong.append("resource_requirements.cpu")
    if memory is not None and expected_memory(memory) is None:
        wrong.append("resource_requirements.memory")
    gpu = resources.get("gpu", {})
    if not isinstance(gpu, dict) or set(gpu) - {"count"}:
        wrong.append("resource_requirements.gpu")
    elif (count := gpu.get("count")) is not None and not (_is_int(count) and 0 < count <= 64):
        wrong.append("resource_requirements.gpu.count")
    return wrong


def violations(request: Any, settings: Settings) -> list[str]:
    """Every rule `request` (json.loads' reading of a submission) breaks."""
    if not isinstance(request, dict):
        return ["request is not an object"]
    wrong = [f"{k} is unknown" for k in set(request) - _REQUEST_KEYS]
    job_id, driver = request.get("job_id"), request.get("driver")
    if job_id is not None and not (isinstance(job_id, str) and _JOB_ID.fullmatch(job_id)):
        wrong.append("job_id")
    if driver is not None and not (isinstance(driver, str) and _DRIVER.fullmatch(driver)):
        wrong.append("driver")
    placement = request.get("placement", {})
    if not isinstance(placement, dict) or set(placement) - {"host"}:
        wrong.append("placement")
    elif (host := placement.get("host")) is not None and not (
        isinstance(host, str) and _HOST.fullmatch(host)
    ):
        wrong.append("placement.host")
    if not _is_str_map(request.get("labels", {}), _label_key_ok):
        wrong.append("labels")
    wrong += _resource_violations(request.get("resource_requirements", {}))
    if "template" not in request:
        return [*wrong, "template is missing"]
    chosen = driver if isinstance(driver, str) else settings.default_driver
    return wrong + _template_violations(request["template"], settings, chosen)


def mismatches(job: Job, request: dict[str, Any], settings: Settings) -> list[str]:
    """Where an accepted job says other than the (valid) request it came from."""
    template = request["template"]
    resources = request.get("resource_requirements", {})
    driver = request.get("driver") or settings.default_driver
    wanted: dict[str, tuple[Any, Any]] = {
        "job_id": (job.job_id, request.get("job_id") or job.job_id),
        "driver": (job.driver, driver),
        "cpu": (job.resource_requirements.cpu, _maybe(expected_cpu, resources.get("cpu"))),
        "memory": (
            job.resource_requirements.memory,
            _maybe(expected_memory, resources.get("memory")),
        ),
        "timeout": (job.template.timeout_seconds, template.get("timeout_seconds")),
        "image": (job.template.image, template["image"]),
        "environment": (job.template.environment, template.get("environment", {})),
        "block": (job.template.driver_config, template.get("driver_config", {}).get(driver, {})),
    }
    return [
        f"{name}: {got!r} != {want!r}"[:300] for name, (got, want) in wanted.items() if got != want
    ]


def _maybe(parse: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else parse(value)


# ---- one submission through the gateway's steps --------------------------------------


@dataclass
class FuzzReport:
    tried: int = 0
    accepted: int = 0
    undecodable: int = 0
    invalid: int = 0
    uncaught: list[str] = field(default_factory=list)
    accepted_invalid: list[str] = field(default_factory=list)
    oversized_rejections: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return len(self.uncaught) + len(self.accepted_invalid) + len(self.oversized_rejections)


def check_submission(body: bytes, settings: Settings, report: FuzzReport) -> None:
    """Run `body` through decode + admit as the gateway does, and judge the outcome."""
    report.tried += 1
    data: Any = None
    try:
        data = decode(body, max_bytes=settings.max_message_bytes)
        job = admit(body, settings)
    except MessageUndecodable as exc:
        report.undecodable += 1
        _check_rejection(body, data, [FieldError(field="request", message=str(exc))], report)
    except RequestInvalid as exc:
        report.invalid += 1
        _check_rejection(body, data, exc.errors, report)
    except Exception:
        report.uncaught.append(_sample(body, traceback.format_exc(limit=4)))
    else:
        report.accepted += 1
        _check_accepted(body, data, job, settings, report)


def _check_rejection(body: bytes, data: Any, errors: list[FieldError], report: FuzzReport) -> None:
    """The event and reply `Gateway._reject` would send serialise, and are small."""
    try:
        job_id = job_id_hint(data) or new_job_id()
        errors = bounded_errors(errors)
        summary = "; ".join(str(e) for e in errors)
        event = Event(
            job_id=job_id, phase=Phase.REJECTED, message=summary, host="gw", errors=errors
        )
        reply = SubmitReply(status=ReplyStatus.REJECTED, job_id=job_id, errors=errors)
        sizes = (len(event.model_dump_json()), len(reply.model_dump_json(exclude_none=True)))
    except Exception:
        report.uncaught.append(_sample(body, traceback.format_exc(limit=4)))
        return
    if sizes[0] > MAX_REJECTED_EVENT_BYTES or sizes[1] > MAX_REPLY_BYTES:
        report.oversized_rejections.append(_sample(body, f"event, reply bytes: {sizes}"))


def _check_accepted(
    body: bytes, data: Any, job: Job, settings: Settings, report: FuzzReport
) -> None:
    wrong = violations(data, settings)
    if not wrong:
        wrong = mismatches(job, data, settings)
    try:
        if Job.model_validate_json(job_message(job).body) != job:
            wrong.append("the job's message reads back as another job")
    except Exception as exc:
        wrong.append(f"the job's message does not read back: {exc!r}"[:300])
    if wrong:
        report.accepted_invalid.append(_sample(body, "; ".join(wrong)))


def _sample(body: bytes, why: str) -> str:
    shown = body if len(body) <= 300 else body[:300] + b"...(%d bytes)" % len(body)
    return f"{shown!r}\n    {why}"


def fuzz_round(
    count: int,
    *,
    seed: int,
    settings: Settings,
    on_progress: Callable[[FuzzReport], None] | None = None,
) -> FuzzReport:
    """`count` submissions from `seed`, each checked; `on_progress` every 10,000."""
    rng = random.Random(seed)
    report = FuzzReport()
    started = time.perf_counter()
    for n in range(1, count + 1):
        check_submission(submission(rng), settings, report)
        if on_progress is not None and n % 10_000 == 0:
            report.seconds = time.perf_counter() - started
            on_progress(report)
    report.seconds = time.perf_counter() - started
    return report
