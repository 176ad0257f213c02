"""What a hung asyncio test was waiting on, printed when pytest-timeout stops it.

pytest-timeout (its limit is in pyproject.toml) prints the threads' stacks, and for an
asyncio test every thread's stack ends in the event loop's select(): it does not say
which await never returned. This prints every task's stack first, then lets
pytest-timeout fail the test as usual, so a hang costs one test and leaves its cause
in the CI log instead of eating the whole run.
"""

from __future__ import annotations

import asyncio
import io
import signal
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest


def asyncio_task_stacks() -> str:
    """Every task of the loop running in this thread, each with the stack it waits on."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "no event loop running\n"
    report = io.StringIO()
    for task in asyncio.all_tasks(loop):
        report.write(f"--- {task!r}\n")
        task.print_stack(limit=12, file=report)
    return report.getvalue()


@pytest.hookimpl(wrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, Any]:
    armed = yield
    on_timeout = signal.getsignal(signal.SIGALRM)
    if not callable(on_timeout):  # pytest-timeout chose its thread method: no SIGALRM
        return armed

    def report_then_fail(signum: int, frame: FrameType | None) -> None:
        terminal = item.config.get_terminal_writer()
        terminal.sep("+", title=f"asyncio tasks of {item.nodeid} at its timeout")
        terminal.write(asyncio_task_stacks())
        on_timeout(signum, frame)

    signal.signal(signal.SIGALRM, report_then_fail)
    return armed
