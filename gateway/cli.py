"""`sandfleet gateway | submit | watch | status`: the gateway and the submitter's side."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sandfleet.common.events import Event, Phase, worker_state
from sandfleet.common.lifecycle import until_signalled
from sandfleet.common.logs import setup_logging
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client
from sandfleet.gateway.render import history_table, print_event, print_reply, workers_table
from sandfleet.gateway.service import run_gateway

console = Console(highlight=False)
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Machine-readable output, one JSON object per line.")
]


def gateway() -> None:
    """Run the gateway: validate submissions and route them to driver queues."""
    settings = Settings()
    setup_logging(settings.log_level)
    asyncio.run(until_signalled(run_gateway(settings)))


def _parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        result[key] = value
    return result


def build_request(
    *,
    driver: str | None,
    image: str | None,
    command: list[str],
    env: list[str],
    labels: list[str],
    timeout: int | None,
    gpu_count: int | None,
    gpu_devices: list[str],
    host: str | None,
    job_id: str | None,
    cpu: str | None,
    memory: str | None,
) -> dict[str, Any]:
    """The request the submit flags describe; the gateway does the validating."""
    if image is None:
        raise typer.BadParameter(
            "an image is required (or give the whole request with -f)", param_hint="--image"
        )
    template: dict[str, Any] = {"image": image, "command": command}
    if env:
        template["environment"] = _parse_pairs(env, "--env")
    if timeout is not None:
        template["timeout_seconds"] = timeout
    resources: dict[str, Any] = {}
    if gpu_devices:
        # The IDs name the GPUs, so they also say how many.
        gpu_count = len(gpu_devices)
        block_driver = driver or Settings().default_driver
        template["driver_config"] = {block_driver: {"gpu_device_ids": gpu_devices}}
    if gpu_count is not None:
        resources["gpu"] = {"count": gpu_count}
    if cpu is not None:
        resources["cpu"] = cpu
    if memory is not None:
        resources["memory"] = memory
    request: dict[str, Any] = {"template": template}
    if resources:
        request["resource_requirements"] = resources
    if driver:
        request["driver"] = driver
    if host:
        request["placement"] = {"host": host}
    if job_id:
        request["job_id"] = job_id
    if labels:
        request["labels"] = _parse_pairs(labels, "--label")
    return request


def submit(
    command: Annotated[list[str] | None, typer.Argument(help="The command, after --.")] = None,
    file: Annotated[
        Path | None, typer.Option("-f", "--file", help="A request as JSON ('-' for stdin).")
    ] = None,
    driver: Annotated[
        str | None, typer.Option(help="docker | podman | vm (default: the gateway's).")
    ] = None,
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
    wait: Annotated[bool, typer.Option(help="Follow the job's events until it ends.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Submit a sandbox job: `sandfleet submit --image busybox --wait -- sh -c 'echo hi'`."""
    flags_given = any(
        value for value in (command, driver, image, env, label, timeout, gpu_count, gpu_device,
                            host, job_id, cpu, memory)
    )  # fmt: skip
    if file is not None and flags_given:
        raise typer.BadParameter(
            "give the whole request with -f, or describe it with flags, not both",
            param_hint="--file",
        )
    if file is not None:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        try:
            request: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--file") from exc
    else:
        request = build_request(
            driver=driver, image=image, command=command or [], env=env or [], labels=label or [],
            timeout=timeout, gpu_count=gpu_count, gpu_devices=gpu_device or [], host=host,
            job_id=job_id, cpu=cpu, memory=memory,
        )  # fmt: skip
    raise typer.Exit(asyncio.run(_submit(request, wait=wait, as_json=as_json)))


async def _submit(request: dict[str, Any], *, wait: bool, as_json: bool) -> int:
    async with Client() as client:
        if not wait:
            reply = await client.submit(request)
            _show_reply(reply.model_dump_json(exclude_none=True), reply, as_json)
            return 0 if reply.accepted else 2
        # Subscribe before submitting so no event of the job can be missed.
        async with client.events() as stream:
            reply = await client.submit(request)
            _show_reply(reply.model_dump_json(exclude_none=True), reply, as_json)
            if not reply.accepted:
                return 2
            if reply.duplicate and reply.phase is not None and reply.phase.is_terminal:
                return 0 if reply.phase is Phase.SUCCEEDED else 1
            async for event in stream:
                if event.job_id != reply.job_id or event.phase is Phase.ACCEPTED:
                    continue
                _show_event(event, as_json)
                if event.phase.is_terminal:
                    return 0 if event.phase is Phase.SUCCEEDED else 1
    return 1


def _show_reply(raw: str, reply: Any, as_json: bool) -> None:
    if as_json:
        print(raw, flush=True)
    else:
        print_reply(console, reply)


def _show_event(event: Event, as_json: bool) -> None:
    if as_json:
        print(event.model_dump_json(), flush=True)
    else:
        print_event(console, event)


def watch(
    job: Annotated[str | None, typer.Option(help="Only this job's events.")] = None,
    driver: Annotated[str | None, typer.Option(help="Only this driver's events.")] = None,
    host: Annotated[str | None, typer.Option(help="Only this host's events.")] = None,
    phase: Annotated[
        list[Phase] | None, typer.Option(help="Only these phases, repeatable.")
    ] = None,
    from_start: Annotated[bool, typer.Option(help="Replay the event log's history first.")] = False,
    heartbeats: Annotated[bool, typer.Option(help="Include worker heartbeats.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Follow the event stream live (Ctrl-C to stop)."""
    phases = set(phase or [])
    if not heartbeats and not phases:
        phases = set(Phase) - {Phase.HEARTBEAT}

    async def follow() -> None:
        async with Client() as client:
            stream = client.events(
                job_id=job, driver=driver, host=host, phases=phases, from_start=from_start
            )
            async with stream:
                async for event in stream:
                    _show_event(event, as_json)

    asyncio.run(until_signalled(follow()))


def status(
    job_id: Annotated[str, typer.Argument(help="The job to look up.")],
    as_json: JsonFlag = False,
) -> None:
    """A job's current phase and its history, from the event log."""

    async def lookup() -> list[Event]:
        async with Client() as client:
            return await client.history(job_id)

    events = asyncio.run(lookup())
    current = events[-1].phase.value if events else None
    if as_json:
        print(json.dumps({
            "job_id": job_id,
            "phase": current,
            "events": [e.model_dump(mode="json") for e in events],
        }))  # fmt: skip
    elif not events:
        console.print(f"no events for job {job_id}", style="yellow")
    else:
        console.print(f"{job_id}: [bold]{current}[/]")
        console.print(history_table(job_id, events))
    raise typer.Exit(0 if events else 1)


def workers(
    since: Annotated[int, typer.Option(help="Look back this many minutes of heartbeats.")] = 10,
    as_json: JsonFlag = False,
) -> None:
    """Workers per host, from their heartbeats: driver, slots, free GPUs, alive or lost."""

    async def read() -> list[Event]:
        async with Client() as client:
            return await client.workers(since=timedelta(minutes=since))

    beats = asyncio.run(read())
    now = datetime.now(UTC)
    if as_json:
        print(json.dumps([
            {**beat.model_dump(mode="json"), "state": worker_state(beat, now)} for beat in beats
        ]))  # fmt: skip
        return
    console.print(workers_table(beats, now))


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    reason: Annotated[str, typer.Option(help="Why; it appears in the `cancelled` event.")] = (
        "cancelled by request"
    ),
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Cancel a job whether it is queued, waiting for GPUs or running."""

    async def send() -> int:
        async with Client() as client, client.events(job_id=job_id) as stream:
            await client.cancel(job_id, reason=reason)
            if not as_json:
                console.print(f"cancellation of {job_id} sent")
            if not wait:
                return 0
            async for event in stream:
                _show_event(event, as_json)
                if event.phase.is_terminal:
                    return 0 if event.phase is Phase.CANCELLED else 1
        return 1

    raise typer.Exit(asyncio.run(send()))
