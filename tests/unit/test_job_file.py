"""`sandfleet submit -f`: JSON or YAML by the file's name, checked before sending."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest

from sandfleet.gateway.job_file import MAX_JOB_FILE_BYTES, JobFileInvalid, load_job_file

REQUEST = {"job_id": "j1", "template": {"image": "busybox", "command": ["sh", "-c", "echo 1"]}}
AS_YAML = """\
job_id: j1  # YAML may comment
template:
  image: busybox
  command: [sh, -c, "echo 1"]
"""
AS_JSON = '{"job_id": "j1", "template": {"image": "busybox", "command": ["sh", "-c", "echo 1"]}}'


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("job.yaml", AS_YAML),
        ("job.YML", AS_YAML),
        ("job.json", AS_JSON),
        ("job.txt", AS_JSON),
        ("job", AS_YAML),
        ("job.yaml", AS_JSON),  # JSON is YAML too
    ],
)
def test_json_and_yaml_files_give_the_same_request(tmp_path: Path, name: str, text: str) -> None:
    assert load_job_file(write(tmp_path, name, text)) == REQUEST


@pytest.mark.parametrize("text", [AS_JSON, AS_YAML])
def test_stdin_is_json_else_yaml(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert load_job_file("-") == REQUEST


def test_a_json_file_is_only_json(tmp_path: Path) -> None:
    with pytest.raises(JobFileInvalid, match="not JSON"):
        load_job_file(write(tmp_path, "job.json", AS_YAML))


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {image: x}\ntemplate: *b\n",  # an anchor and an alias
        "template: &t {image: x}\n",  # an anchor alone
        'a: &a ["x","x"]\nb: [*a,*a]\nc: [*b,*b]\n',  # the start of an alias bomb
    ],
)
def test_yaml_anchors_and_aliases_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(JobFileInvalid, match="anchors and aliases are not allowed"):
        load_job_file(write(tmp_path, "job.yaml", text))


def test_yaml_tags_beyond_the_safe_ones_are_refused(tmp_path: Path) -> None:
    text = "template: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(JobFileInvalid, match="not YAML"):
        load_job_file(write(tmp_path, "job.yaml", text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "must be a mapping at the top, not a list"),
        ("just text\n", "must be a mapping at the top, not a string"),
        ("", "must be a mapping at the top, not null"),
        ("template: {image: x, when: 2024-01-02}\n", "template.when: a date is not a JSON value"),
        ("template: {image: !!binary aGk=}\n", "template.image: a bytes is not a JSON value"),
        ("template: {command: [.nan]}\n", "template.command.0: nan is not a JSON number"),
        ("labels: {1: x}\n", "labels: key 1 is not a string"),
    ],
)
def test_what_json_cannot_say_is_refused_with_its_path(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(JobFileInvalid, match=message):
        load_job_file(write(tmp_path, "job.yaml", text))


def test_a_file_over_the_gateways_limit_is_refused_unread(tmp_path: Path) -> None:
    padding = " " * MAX_JOB_FILE_BYTES
    with pytest.raises(JobFileInvalid, match=f"over {MAX_JOB_FILE_BYTES} bytes"):
        load_job_file(write(tmp_path, "job.json", AS_JSON + padding))
    fits: Any = load_job_file(write(tmp_path, "job.json", AS_JSON.ljust(MAX_JOB_FILE_BYTES)))
    assert fits == REQUEST


def test_neither_json_nor_yaml_names_both(tmp_path: Path) -> None:
    with pytest.raises(JobFileInvalid, match=r"neither JSON \(.*\) nor YAML"):
        load_job_file(write(tmp_path, "job.txt", "template: [unclosed\n"))


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(JobFileInvalid, match=r"cannot read .*nope\.yaml: No such file"):
        load_job_file(str(tmp_path / "nope.yaml"))
