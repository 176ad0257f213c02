"""The `sandfleet` command's exit codes, and the one place where errors become them.

Every command is registered wrapped in `exits_mapped`, so an unreachable broker, an
unknown job, a --timeout or Ctrl-C end every command the same way: one line on
stderr (never a traceback) and the code below. README's "Exit codes" table is this.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import ParamSpec

import typer
from aiormq.exceptions import AMQPError

from sandfleet.common.errors import (
    CancelRefused,
    FleetUnreachable,
    JobNotFound,
    SandfleetError,
    SubmissionRejected,
)
from sandfleet.common.events import Event, Phase

P = ParamSpec("P")


class ExitCode(IntEnum):
    SUCCEEDED = 0
    JOB_DID_NOT_SUCCEED = 1  # failed, timed out or cancelled
    REJECTED = 2  # by the gateway or a worker; click's usage errors are 2 as well
    FLEET_UNREACHABLE = 3
    JOB_NOT_FOUND = 4
    MISCONFIGURED = 78  # like sysexits' EX_CONFIG: a setting, key or account is wrong
    TIMED_OUT = 124  # like timeout(1)
    INTERRUPTED = 130  # 128 + SIGINT, like a shell


def exit_code_of(outcome: Event) -> ExitCode:
    """A job's exit code from its terminal event."""
    if outcome.phase is Phase.SUCCEEDED:
        return ExitCode.SUCCEEDED
    if outcome.phase is Phase.REJECTED:
        return ExitCode.REJECTED
    return ExitCode.JOB_DID_NOT_SUCCEED


def exits_mapped(command: Callable[P, None]) -> Callable[P, None]:
    """`command`, with sandfleet's errors turned into one stderr line and an exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt:  # recent typer does the same; click alone exits 1
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except FleetUnreachable as exc:
            raise _fail(str(exc), ExitCode.FLEET_UNREACHABLE) from None
        except JobNotFound as exc:
            raise _fail(str(exc), ExitCode.JOB_NOT_FOUND) from None
        except (SubmissionRejected, CancelRefused) as exc:
            raise _fail(str(exc), ExitCode.REJECTED) from None
        except TimeoutError as exc:
            raise _fail(str(exc) or "timed out", ExitCode.TIMED_OUT) from None
        except AMQPError as exc:  # e.g. ACCESS_REFUSED: these credentials cannot do this
            raise _fail(f"the broker refused: {exc}", ExitCode.FLEET_UNREACHABLE) from None
        except SandfleetError as exc:  # no trusted keys, an unreadable key, set-up refused
            raise _fail(str(exc), ExitCode.MISCONFIGURED) from None

    return run


def _fail(message: str, code: ExitCode) -> typer.Exit:
    one_line = " ".join(message.splitlines())
    print(f"sandfleet: {one_line}", file=sys.stderr, flush=True)
    return typer.Exit(code)
