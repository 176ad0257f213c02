"""The warm shim's encoding, and the shim itself under the host's shells (dash and
busybox sh, the one the test image has): hostile values arrive exactly."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandfleet.workers.drivers.warm_shim import (
    ORPHANED_EXIT_CODE,
    PROTOCOL_EXIT_CODE,
    SHIM,
    SHIM_NAME,
    encode,
    job_argv,
    job_lines,
)

HOSTILE = [
    "two\nlines",
    "trailing newlines\n\n",
    "'single' \"double\"",
    "$(echo no) ${HOME} $HOME",
    "`echo no`",
    "back\\slash \\n \\0101 \\",
    "é€ 日本",
    "",
    " leading and trailing ",
    "-n",
    "--",
    "%s %b %%",
    "1\n2",
]
SHELLS = [
    pytest.param(["/bin/sh"], id="sh"),
    pytest.param(
        ["busybox", "sh"],
        id="busybox",
        marks=pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox here"),
    ),
]
# Prints each argument NUL-terminated, then V's value: exactly what arrived.
PRINT_ALL = 'for a in "$@"; do printf "%s\\0" "$a"; done; printf "%s" "$V"'


def run_shim(shell: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*shell, "-c", SHIM, SHIM_NAME], check=False, input=stdin, capture_output=True, timeout=60
    )


@given(st.text())
def test_an_encoded_value_holds_only_letters_digits_and_octal_escapes(value: str) -> None:
    assert re.fullmatch(r"(?:[A-Za-z0-9]|\\0[0-7]{3})*", encode(value))


def test_a_digit_after_an_escape_stays_a_digit() -> None:
    assert encode("\n1") == "\\00121"
    assert encode("a b") == "a\\0040b"


def test_the_job_runs_the_images_entrypoint_then_its_own_command_or_the_images() -> None:
    assert job_argv(["x"], ["ep"], ["cmd"]) == ["ep", "x"]
    assert job_argv([], ["ep"], ["cmd"]) == ["ep", "cmd"]
    assert job_argv(["x"], [], ["cmd"]) == ["x"]


@pytest.mark.parametrize("shell", SHELLS)
def test_hostile_argv_and_environment_arrive_exactly(shell: list[str]) -> None:
    value = "line\n$(echo no)`echo no`'\"\\\n\n"
    lines = job_lines(["sh", "-c", PRINT_ALL, "sh", *HOSTILE], {"V": value})
    done = run_shim(shell, lines)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == b"".join(f"{a}\0".encode() for a in HOSTILE) + value.encode()


@pytest.mark.parametrize("shell", SHELLS)
def test_an_argv_of_a_thousand_elements_arrives_in_order(shell: list[str]) -> None:
    argv = [f"element {i}\n" for i in range(1000)]
    done = run_shim(shell, job_lines(["sh", "-c", PRINT_ALL, "sh", *argv], {}))
    assert done.returncode == 0
    assert done.stdout.split(b"\0")[:-1] == [a.encode() for a in argv]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_jobs_variables_win_over_the_shims_own(shell: list[str]) -> None:
    environment = {"_sandfleet_kind": "k", "_sandfleet_enc": "e", "_sandfleet_v": "v", "V": ""}
    script = 'printf "%s," "$_sandfleet_kind" "$_sandfleet_enc" "$_sandfleet_v"'
    done = run_shim(shell, job_lines(["sh", "-c", script], environment))
    assert done.stdout == b"k,e,v,"


@pytest.mark.parametrize("shell", SHELLS)
def test_the_jobs_exit_code_is_the_shims(shell: list[str]) -> None:
    assert run_shim(shell, job_lines(["sh", "-c", "exit 9"], {})).returncode == 9


@pytest.mark.parametrize("shell", SHELLS)
def test_stdin_ending_before_go_runs_nothing(shell: list[str]) -> None:
    half = job_lines(["sh", "-c", "echo ran"], {}).removesuffix(b"go\n")
    done = run_shim(shell, half)
    assert (done.returncode, done.stdout) == (ORPHANED_EXIT_CODE, b"")
    assert b"no job ran" in done.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_an_unknown_line_runs_nothing(shell: list[str]) -> None:
    done = run_shim(shell, b"a \\0145\\0143\\0150\\0157\nx $(echo)\ngo\n")
    assert (done.returncode, done.stdout) == (PROTOCOL_EXIT_CODE, b"")


@pytest.mark.parametrize("shell", SHELLS)
def test_the_job_reads_no_stdin_of_the_shims(shell: list[str]) -> None:
    done = run_shim(shell, job_lines(["cat"], {}) + b"more for the shim\n")
    assert (done.returncode, done.stdout) == (0, b"")
