"""Event and reply data is printed as itself: rich markup in it is neither interpreted
nor fatal (a rejected label `[/bold]` once crashed `watch`)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from rich.console import Console

from sandfleet.common.errors import FieldError
from sandfleet.common.events import Event, Phase, WorkerHealth
from sandfleet.common.models import ReplyStatus, SubmitReply
from sandfleet.gateway.render import (
    history_table,
    make_console,
    print_event,
    print_reply,
    status_line,
    workers_table,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
# Closing a tag never opened, styles, a link, an emoji code: each changes or breaks
# what rich prints when a string is taken as markup.
HOSTILE = ["[/bold]", "[red]", "[link=x]", ":thumbs_up:"]


def hostile(tag: str) -> str:
    return f"a{tag}b"


def event(tag: str, phase: Phase = Phase.REJECTED, **extra: object) -> Event:
    text = hostile(tag)
    values: dict[str, object] = {
        "job_id": text,
        "phase": phase,
        "reason": text,
        "message": text,
        "driver": text,
        "host": text,
        "worker_id": text,
        "gpus": [text],
        "exit_code": 1,
        "output": f"{text}\nsecond {text}\n",
        "errors": [FieldError(field=f"labels.{text}", message=text)],
        "timestamp": NOW,
        **extra,
    }
    return Event.model_validate(values)


def printed(draw: object) -> str:
    """What a default console (markup and emoji on) prints for `draw`."""
    out = io.StringIO()
    console = Console(file=out, width=400, color_system=None)
    if callable(draw):
        draw(console)
    else:
        console.print(draw)
    return out.getvalue()


@pytest.mark.parametrize("tag", HOSTILE)
def test_an_event_prints_every_field_literally(tag: str) -> None:
    text = printed(lambda console: print_event(console, event(tag)))
    # job id, driver@host, reason, gpus, message; the error's field and message; the
    # two output lines
    assert text.count(hostile(tag)) == 10, text


@pytest.mark.parametrize("tag", HOSTILE)
def test_replies_print_literally(tag: str) -> None:
    text = hostile(tag)
    rejected = SubmitReply(
        status=ReplyStatus.REJECTED,
        job_id=text,
        errors=[FieldError(field=text, message=text)],
    )
    accepted = SubmitReply(status=ReplyStatus.ACCEPTED, job_id=text)
    duplicate = SubmitReply(
        status=ReplyStatus.ACCEPTED, job_id=text, duplicate=True, phase=Phase.RUNNING
    )
    assert printed(lambda console: print_reply(console, rejected)).count(text) == 3
    for reply in (accepted, duplicate):
        assert printed(lambda console, r=reply: print_reply(console, r)).count(text) == 1


@pytest.mark.parametrize("tag", HOSTILE)
def test_status_and_history_table_print_literally(tag: str) -> None:
    text = hostile(tag)
    table = printed(history_table(text, [event(tag), event(tag, Phase.FAILED)]))
    # the title, and per row: where (driver@host), reason, message
    assert table.count(text) == 1 + 2 * 4, table
    assert printed(status_line(text, Phase.FAILED)).strip() == f"{text}: failed"


@pytest.mark.parametrize("tag", HOSTILE)
def test_workers_table_prints_literally(tag: str) -> None:
    health = WorkerHealth(slots=2, free_slots=1, started_at=NOW, heartbeat_seconds=10)
    beat = event(tag, Phase.HEARTBEAT, job_id=None, health=health, errors=[], output=None)
    text = printed(workers_table([beat], NOW + timedelta(seconds=3)))
    assert text.count(hostile(tag)) == 3, text  # host, driver, worker


def test_workers_table_sums_each_workers_warm_pools() -> None:
    pools = [{"pool": "a", "ready": 1, "target": 4}, {"pool": "b", "ready": 2, "target": 2}]
    health = WorkerHealth(
        slots=2, free_slots=1, started_at=NOW, heartbeat_seconds=10, warm_pools=pools
    )
    beat = event("w", Phase.HEARTBEAT, job_id=None, health=health, errors=[], output=None)
    cold = beat.model_copy(update={"health": health.model_copy(update={"warm_pools": []})})
    rows = printed(workers_table([beat, cold], NOW)).splitlines()
    assert "3/6" in next(row for row in rows if row.count("│") > 3 and "1/2" in row)
    assert sum("3/6" in row for row in rows) == 1


def test_the_cli_console_takes_plain_strings_literally() -> None:
    console = make_console()
    with console.capture() as captured:
        console.print("[/bold] [red]x :thumbs_up:")
    assert captured.get() == "[/bold] [red]x :thumbs_up:\n"
