"""Reading a job file for `sandfleet submit -f`: JSON or YAML, checked before it is sent.

`.yaml`/`.yml` is YAML, `.json` is JSON; stdin (`-`) and any other name are tried as
JSON, then as YAML. YAML goes through a safe loader that also refuses anchors and
aliases (an alias "bomb" expands a small file into gigabytes), and what either
format gives must be a mapping of plain JSON values: a YAML date or binary would
otherwise be sent as something the gateway never agreed to read.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from sandfleet.common.settings import Settings

# The gateway's default limit on a submission: a bigger file would be rejected anyway.
MAX_JOB_FILE_BYTES: int = Settings.model_fields["max_message_bytes"].default

# `sandfleet submit -f sweep.jsonl`: one request per line, sent as batch submissions.
SWEEP_SUFFIXES = {".jsonl", ".ndjson"}
MAX_SWEEP_REQUESTS = 100_000

_YAML_SUFFIXES = {".yaml", ".yml"}
_JSON_SUFFIXES = {".json"}


class JobFileInvalid(ValueError):
    """The job file cannot be read, parsed, or is not a JSON-like mapping."""


def load_job_file(name: str) -> dict[str, Any]:
    """The request in file `name` (`-`: stdin), as a JSON-ready dict."""
    text = _read(name)
    suffix = "" if name == "-" else Path(name).suffix.lower()
    if suffix in _YAML_SUFFIXES:
        data = _parse_yaml(text)
    elif suffix in _JSON_SUFFIXES:
        data = _parse_json(text)
    else:
        data = _parse_either(text)
    if not isinstance(data, dict):
        raise JobFileInvalid(f"the request must be a mapping at the top, not {_kind(data)}")
    _check_json_value(data, "")
    return data


def is_sweep_file(name: str) -> bool:
    return Path(name).suffix.lower() in SWEEP_SUFFIXES


def load_sweep_file(name: str) -> tuple[list[int], list[dict[str, Any]]]:
    """The requests of a JSON-lines file (one request per line; blank lines skipped), with
    their line numbers. Each line is checked as a job file is, its errors named by line."""
    lines: list[int] = []
    requests: list[dict[str, Any]] = []
    try:
        with open(name, "rb") as file:
            for number, raw in enumerate(
                iter(lambda: file.readline(MAX_JOB_FILE_BYTES + 1), b""), 1
            ):
                if not raw.strip():
                    continue
                if len(requests) == MAX_SWEEP_REQUESTS:
                    raise JobFileInvalid(f"over {MAX_SWEEP_REQUESTS} requests; split the file")
                requests.append(_sweep_line(raw, number))
                lines.append(number)
    except OSError as exc:
        raise JobFileInvalid(f"cannot read {name}: {exc.strerror or exc}") from None
    if not requests:
        raise JobFileInvalid(f"{name} holds no requests")
    return lines, requests


def _sweep_line(raw: bytes, number: int) -> dict[str, Any]:
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise JobFileInvalid(f"line {number}: over {MAX_JOB_FILE_BYTES} bytes, the gateway's limit")
    try:
        data = _parse_json(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise JobFileInvalid(f"the request must be a mapping, not {_kind(data)}")
        _check_json_value(data, "")
    except UnicodeDecodeError as exc:
        raise JobFileInvalid(f"line {number}: not UTF-8 text: {exc}") from None
    except JobFileInvalid as exc:
        raise JobFileInvalid(f"line {number}: {exc}") from None
    return data


def _read(name: str) -> str:
    try:
        if name == "-":
            raw = sys.stdin.buffer.read(MAX_JOB_FILE_BYTES + 1)
        else:
            with open(name, "rb") as file:
                raw = file.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as exc:
        raise JobFileInvalid(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise JobFileInvalid(f"over {MAX_JOB_FILE_BYTES} bytes, the gateway's limit")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobFileInvalid(f"not UTF-8 text: {exc}") from None


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobFileInvalid(f"not JSON: {exc}") from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_PlainYamlLoader)
    except yaml.YAMLError as exc:
        raise JobFileInvalid(f"not YAML: {exc}") from None


def _parse_either(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            return _parse_yaml(text)
        except JobFileInvalid as yaml_error:
            raise JobFileInvalid(f"neither JSON ({json_error}) nor YAML ({yaml_error})") from None


class _PlainYamlLoader(yaml.SafeLoader):
    """YAML's safe subset, less anchors and aliases."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


def _check_json_value(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise JobFileInvalid(f"{path or 'the request'}: key {key!r} is not a string")
            _check_json_value(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}.{index}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise JobFileInvalid(f"{path}: {value} is not a JSON number")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise JobFileInvalid(f"{path}: {_kind(value)} is not a JSON value (quote it)")


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
