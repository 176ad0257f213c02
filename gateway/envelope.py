"""The gateway's rules for the portable envelope; it never reads inside a driver block."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import ValidationError

from sandfleet.common.errors import FieldError, MessageUndecodable, RequestInvalid
from sandfleet.common.models import Job, JobTemplate, SandboxRequest, field_errors
from sandfleet.common.settings import Settings


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def decode(body: bytes, *, max_bytes: int) -> Any:
    """The message body as JSON; MessageUndecodable when it is not JSON at all."""
    if len(body) > max_bytes:
        raise MessageUndecodable(f"message is {len(body)} bytes; the limit is {max_bytes}")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageUndecodable(f"message body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise MessageUndecodable("message body nests JSON too deeply to read") from exc


def job_id_hint(data: Any) -> str | None:
    """The client's job_id, if it sent a usable one, to label a rejection with."""
    if isinstance(data, dict):
        job_id = data.get("job_id")
        if isinstance(job_id, str) and 0 < len(job_id) <= 63:
            return job_id
    return None


def admit(body: bytes, settings: Settings) -> Job:
    """Validate a request (already known to be JSON) and bind it to its driver.

    Validation runs on the JSON text, in strict JSON mode: "2" is not a count.
    RequestInvalid lists every error, each named by its full field path.
    """
    try:
        request = SandboxRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestInvalid(field_errors(exc)) from exc

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
    size = len(json.dumps(envelope, separators=(",", ":")).encode())
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
