"""`sandfleet gateway | submit | wait | watch | workers | cancel`: the gateway and
the submitter's side. Exit codes: `sandfleet.gateway.exits`; output: `render.Output`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.text import Text

from sandfleet.common.errors import SubmissionRejected
from sandfleet.common.event_loop import run_fast
from sandfleet.common.events import JOB_PHASES, Event, Phase, worker_state
from sandfleet.common.lifecycle import until_signalled
from sandfleet.common.logs import setup_logging
from sandfleet.common.metrics import MetricsPort
from sandfleet.common.models import CancelRequest
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.gateway.events_stream import EventFilter, EventStream
from sandfleet.gateway.exits import ExitCode, exit_code_of
from sandfleet.gateway.job_file import (
    JobFileInvalid,
    is_sweep_file,
    load_job_file,
    load_sweep_file,
)
from sandfleet.gateway.process_tuning import tune_gateway_process
from sandfleet.gateway.render import (
    Output,
    make_console,
    print_sweep,
    workers_table,
)
from sandfleet.gateway.request_flags import build_request
from sandfleet.gateway.service import run_gateway

StreamJson = Annotated[
    bool, typer.Option("--json", help="JSON for scripts: one object per line, as they come.")
]
DocumentJson = Annotated[bool, typer.Option("--json", help="JSON for scripts: one document.")]
DriverOption = Annotated[
    str | None,
    typer.Option(
        help="A driver's name: docker, podman, vm or any installed (default: the gateway's)."
    ),
]


def _exit_with(body: Coroutine[Any, Any, int]) -> NoReturn:
    raise typer.Exit(asyncio.run(body))


def gateway(metrics_port: MetricsPort = None) -> None:
    """Run the gateway: validate submissions and route them to driver queues."""
    settings = Settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    setup_logging(settings.log_level)
    tune_gateway_process()
    run_fast(until_signalled(run_gateway(settings)))


def submit(
    command: Annotated[list[str] | None, typer.Argument(help="The command, after --.")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "-f", "--file", help="A request: JSON, YAML ('-': stdin); .jsonl: a sweep, one a line"
        ),
    ] = None,
    driver: DriverOption = None,
    image: Annotated[str | None, typer.Option(help="The sandbox image.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, repeatable.")
    ] = None,
    timeout: Annotated[int | None, typer.Option(help="timeout_seconds for the sandbox.")] = None,
    gpu_count: Annotated[int | None, typer.Option(help="How many GPUs (any free ones).")] = None,
    gpu_device: Annotated[
        list[str] | None,
        typer.Option(help="An exact GPU ID (CDI name or PCI address), repeatable; sets the count."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Pin the job to this host.")] = None,
    job_id: Annotated[str | None, typer.Option(help="Client-chosen job id.")] = None,
    cpu: Annotated[str | None, typer.Option(help="CPU cores, e.g. 2 or 500m.")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory, e.g. 512Mi or 4Gi.")] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the job's events until it ends; exit by its outcome.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="JSON for scripts: the reply; with --wait, then one event per line."
        ),
    ] = False,
) -> None:
    """Submit a sandbox job: `sandfleet submit --image busybox --wait -- sh -c 'echo hi'`."""
    flags_given = any(
        value is not None and value != []
        for value in (command, driver, image, env, label, timeout, gpu_count, gpu_device,
                      host, job_id, cpu, memory)
    )  # fmt: skip
    if file is not None and flags_given:
        raise typer.BadParameter(
            "give the whole request with -f, or describe it with flags, not both",
            param_hint="--file",
        )
    out = Output(as_json)
    if file is not None and is_sweep_file(str(file)):
        _exit_with(_submit_sweep(*_sweep_from_file(file, wait=wait), out))
    if file is not None:
        request = _request_from_file(file)
    else:
        request = build_request(
            driver=driver, image=image, command=command or [], env=env or [], labels=label or [],
            timeout=timeout, gpu_count=gpu_count, gpu_devices=gpu_device or [], host=host,
            job_id=job_id, cpu=cpu, memory=memory,
        )  # fmt: skip
    _exit_with(_submit_and_follow(request, out) if wait else _submit(request, out))


def _request_from_file(file: Path) -> dict[str, Any]:
    try:
        return load_job_file(str(file))
    except JobFileInvalid as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from None


def _sweep_from_file(file: Path, *, wait: bool) -> tuple[list[int], list[dict[str, Any]]]:
    if wait:
        raise typer.BadParameter("a sweep is not waited for", param_hint="--wait")
    try:
        return load_sweep_file(str(file))
    except JobFileInvalid as exc:
        raise typer.BadParameter(str(exc), param_hint="--file") from None


async def _submit_sweep(lines: list[int], requests: list[dict[str, Any]], out: Output) -> int:
    started = time.monotonic()
    async with Client() as client:
        replies = await client.submit_many(requests)
    if out.as_json:
        for line, reply in zip(lines, replies, strict=True):
            out.json_line({"line": line, **reply.model_dump(mode="json", exclude_none=True)})
    else:
        print_sweep(out.console, lines, replies, time.monotonic() - started)
    return ExitCode.SUCCEEDED if all(reply.accepted for reply in replies) else ExitCode.REJECTED


async def _submit(request: dict[str, Any], out: Output) -> int:
    async with Client() as client:
        reply = await client.submit(request)
    out.reply(reply)
    return ExitCode.SUCCEEDED if reply.accepted else ExitCode.REJECTED


async def _submit_and_follow(request: dict[str, Any], out: Output) -> int:
    async with Client() as client:
        try:
            async with client.start(request) as job:  # subscribed before it submits
                out.reply(job.reply)
                outcome = None
                async for outcome in job:
                    if outcome.phase is not Phase.ACCEPTED:  # the reply said so already
                        out.event(outcome)
        except SubmissionRejected as exc:
            out.reply(exc.reply)
            return ExitCode.REJECTED
    assert outcome is not None
    return exit_code_of(outcome)


def wait(
    job_id: Annotated[str, typer.Argument(help="The job to wait for.")],
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Give up after this many seconds (exit 124)."),
    ] = None,
    as_json: StreamJson = False,
) -> None:
    """Wait until a job ends (at once if it has) and print its last event; exit by its outcome."""
    out = Output(as_json)

    async def body() -> int:
        async with Client() as client:
            try:
                outcome = await client.wait(job_id, timeout=timeout)
            except TimeoutError:
                if timeout is None:
                    raise
                raise TimeoutError(f"job {job_id} did not end within {timeout:g} s") from None
        out.event(outcome)
        return exit_code_of(outcome)

    _exit_with(body())


def watch(
    job: Annotated[
        str | None, typer.Option(help="Only this job's events; end with its last one.")
    ] = None,
    driver: Annotated[str | None, typer.Option(help="Only this driver's events.")] = None,
    host: Annotated[str | None, typer.Option(help="Only this host's events.")] = None,
    phase: Annotated[
        list[Phase] | None, typer.Option(help="Only these phases, repeatable.")
    ] = None,
    from_start: Annotated[bool, typer.Option(help="Replay the event log's history first.")] = False,
    heartbeats: Annotated[bool, typer.Option(help="Include worker heartbeats.")] = False,
    as_json: StreamJson = False,
) -> None:
    """Follow events live (Ctrl-C to stop); with --job, until that job ends: exit by its outcome."""
    phases = set(phase or [])
    if not heartbeats and not phases:
        phases = set(JOB_PHASES)
    # Shown events are filtered here, not in the stream: with --job, the job's terminal
    # event ends the watch even when its phase, driver or host is not shown.
    shown = EventFilter(driver=driver, host=host, phases=phases)
    out = Output(as_json)

    def show(event: Event) -> None:
        if shown(event):
            out.event(event)

    async def body() -> int:
        # One job's history is read even without --from-start (and shown only with it):
        # a job that has ended ends the watch at once.
        replay = from_start or job is not None
        # Every job phase is read (a --job watch ends on any terminal one), heartbeats
        # (their own log: EventFilter.logs) only when they are shown.
        read = set(Phase) if heartbeats or Phase.HEARTBEAT in phases else JOB_PHASES
        async with (
            Client() as client,
            client.events(job_id=job, from_start=replay, phases=read) as stream,
        ):
            if job is not None:
                return await _watch_one_job(stream, show, show_past=from_start)
            async for event in stream:
                show(event)
        return ExitCode.SUCCEEDED  # not reached: a live stream does not end

    _exit_with(body())


async def _watch_one_job(
    stream: EventStream, show: Callable[[Event], None], *, show_past: bool
) -> int:
    """Show the job's events until its end; its exit code."""

    def seen(event: Event, live: bool) -> None:
        if live or show_past:
            show(event)

    outcome = await stream.job_outcome(seen=seen)
    assert outcome is not None
    return exit_code_of(outcome)


def workers(
    since: Annotated[int, typer.Option(help="Look back this many minutes of heartbeats.")] = 10,
    as_json: DocumentJson = False,
) -> None:
    """Workers per host, from their heartbeats: driver, slots, free GPUs, alive or lost."""

    async def read() -> list[Event]:
        async with Client() as client:
            return await client.workers(since=timedelta(minutes=since))

    beats = asyncio.run(read())
    now = datetime.now(UTC)
    if as_json:
        Output(as_json).json_line([
            {**beat.model_dump(mode="json"), "state": worker_state(beat, now)} for beat in beats
        ])  # fmt: skip
        return
    make_console().print(workers_table(beats, now))


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    reason: Annotated[str, typer.Option(help="Why; it appears in the `cancelled` event.")] = (
        "cancelled by request"
    ),
    wait: Annotated[
        bool, typer.Option(help="Wait until the job ends; exit 0 if it ended cancelled, else 1.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='JSON for scripts: {"job_id", "cancel_requested"}; with --wait, then its '
            "last event.",
        ),
    ] = False,
) -> None:
    """Cancel a job whether it is queued, waiting for GPUs or running."""
    _check_cancel(job_id, reason)
    out = Output(as_json)

    async def send() -> int:
        async with Client() as client:
            await client.cancel(job_id, reason=reason)
            if as_json:
                out.json_line({"job_id": job_id, "cancel_requested": True})
            else:
                out.console.print(Text(f"cancellation of {job_id} sent"))
            if not wait:
                return ExitCode.SUCCEEDED
            outcome = await client.wait(job_id)
        out.event(outcome)
        cancelled = outcome.phase is Phase.CANCELLED
        return ExitCode.SUCCEEDED if cancelled else ExitCode.JOB_DID_NOT_SUCCEED

    _exit_with(send())


def _check_cancel(job_id: str, reason: str) -> None:
    """Refuse a malformed job id or reason as a usage error, before connecting."""
    try:
        CancelRequest(job_id=job_id, reason=reason)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        hint = "JOB_ID" if error["loc"][:1] == ("job_id",) else "--reason"
        raise typer.BadParameter(error["msg"], param_hint=hint) from None
