"""The gateway's rules for the portable envelope; it never reads inside a driver block.

Whatever bytes arrive, `decode` and `admit` either return or raise MessageUndecodable or
RequestInvalid: a submission the gateway cannot take is answered and dead-lettered,
never requeued to poison the queue. `bounded_errors` keeps that answer small whatever
the submission's size.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, NoReturn

from pydantic import ValidationError

from sandfleet.common.errors import (
    MAX_REPORTED_ERRORS,
    FieldError,
    MessageUndecodable,
    RequestInvalid,
    bounded_errors,
)
from sandfleet.common.models import (
    JOB_ID_PATTERN,
    MAX_TIMEOUT_CONTEXT,
    Job,
    JobTemplate,
    SandboxRequest,
    field_errors,
)
from sandfleet.common.settings import Settings

# Python's own limit on int() from text (sys.int_info.default_max_str_digits), which
# pydantic's JSON parser keeps too; stated here so a process setting cannot move it.
MAX_INTEGER_DIGITS = 4300


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def decode(body: bytes, *, max_bytes: int) -> Any:
    """The message body as JSON; MessageUndecodable when it is not JSON at all."""
    if len(body) > max_bytes:
        raise MessageUndecodable(f"message is {len(body)} bytes; the limit is {max_bytes}")
    try:
        return json.loads(body, parse_int=_bounded_int, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and int()'s own limit
        raise MessageUndecodable(f"message body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise MessageUndecodable("message body nests JSON too deeply to read") from exc


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise MessageUndecodable(f"a number has more than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> NoReturn:
    raise MessageUndecodable(f"message body is not JSON: {name} is not a JSON number")


def job_id_hint(data: Any) -> str | None:
    """The client's job_id, if it sent a well-formed one, to label a rejection with."""
    if isinstance(data, dict):
        job_id = data.get("job_id")
        # Only the pattern's ids: anything else (a lone surrogate, say) could not even
        # be written into the rejected event.
        if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id):
            return job_id
    return None


def admit(body: bytes, settings: Settings) -> Job:
    """Validate a request and bind it to its driver.

    Validation runs on the JSON text, in strict JSON mode: "2" is not a count.
    RequestInvalid lists every error (bounded_errors' share of them), each named by
    its full field path.
    """
    context = {MAX_TIMEOUT_CONTEXT: settings.max_timeout_seconds}
    try:
        request = SandboxRequest.model_validate_json(body, context=context)
    except ValidationError as exc:
        first = field_errors(exc, limit=MAX_REPORTED_ERRORS)
        raise RequestInvalid(bounded_errors(first, total=exc.error_count())) from exc

    driver = request.driver or settings.default_driver
    block, errors = _active_block(request, driver, settings.max_driver_config_bytes)
    if errors:
        raise RequestInvalid(errors)

    template = request.template
    return Job(
        job_id=request.job_id or new_job_id(),
        driver=driver,
        placement=request.placement,
        labels=request.labels,
        resource_requirements=request.resource_requirements,
        template=JobTemplate(
            image=template.image,
            command=template.command,
            environment=template.environment,
            labels=template.labels,
            timeout_seconds=template.timeout_seconds,
            driver_config=block,
        ),
    )


def _active_block(
    request: SandboxRequest, driver: str, max_bytes: int
) -> tuple[dict[str, Any], list[FieldError]]:
    """The active driver's inner object; other drivers' blocks are dropped unread."""
    envelope = request.template.driver_config
    try:
        # allow_nan=False: pydantic's parser reads NaN, Infinity and 1e400 into Python
        # floats that JSON cannot carry; forwarded, they would arrive as null.
        size = len(json.dumps(envelope, separators=(",", ":"), allow_nan=False).encode())
    except ValueError:
        message = "holds a number JSON cannot carry (NaN, Infinity, or beyond a float's range)"
        return {}, [FieldError(field="template.driver_config", message=message)]
    if size > max_bytes:
        message = f"serialized size is {size} bytes; the limit is {max_bytes}"
        return {}, [FieldError(field="template.driver_config", message=message)]
    block = envelope.get(driver, {})
    if not isinstance(block, dict):
        message = f"must be a JSON object, not {_json_type(block)}"
        return {}, [FieldError(field=f"template.driver_config.{driver}", message=message)]
    return block, []


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"
