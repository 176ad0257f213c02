"""The CLI's exit codes, and the one place errors become them."""

from __future__ import annotations

import pytest
import typer

from sandfleet.common.errors import FleetUnreachable, JobNotFound, SubmissionRejected
from sandfleet.common.events import Event, Phase
from sandfleet.common.models import ReplyStatus, SubmitReply
from sandfleet.gateway.exits import ExitCode, exit_code_of, exits_mapped


@pytest.mark.parametrize(
    ("phase", "code"),
    [
        (Phase.SUCCEEDED, 0),
        (Phase.FAILED, 1),
        (Phase.TIMED_OUT, 1),
        (Phase.CANCELLED, 1),
        (Phase.REJECTED, 2),
    ],
)
def test_a_jobs_outcome_gives_its_exit_code(phase: Phase, code: int) -> None:
    assert exit_code_of(Event(job_id="j", phase=phase, host="h")) == code


REJECTED = SubmitReply(status=ReplyStatus.REJECTED, job_id="j", errors=[])


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            FleetUnreachable("amqp://u:***@h/", "Connection refused"),
            ExitCode.FLEET_UNREACHABLE,
            "sandfleet: cannot reach the fleet at amqp://u:***@h/: Connection refused\n",
        ),
        (JobNotFound("j"), ExitCode.JOB_NOT_FOUND, "sandfleet: no job 'j' in the event log\n"),
        (
            SubmissionRejected(REJECTED),
            ExitCode.REJECTED,
            "sandfleet: job j rejected: no reason given\n",
        ),
        (
            TimeoutError("job j did not end\nwithin 1 s"),
            124,
            "sandfleet: job j did not end within 1 s\n",
        ),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, ""),
    ],
)
def test_errors_become_one_stderr_line_and_a_code(
    capsys: pytest.CaptureFixture[str], error: BaseException, code: int, line: str
) -> None:
    def command() -> None:
        raise error

    with pytest.raises(typer.Exit) as exited:
        exits_mapped(command)()
    assert exited.value.exit_code == code
    assert capsys.readouterr() == ("", line)


def test_other_errors_pass_through() -> None:
    def command() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        exits_mapped(command)()
