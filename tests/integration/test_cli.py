"""The `sandfleet` command as a person runs it, against a real broker and worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from sandfleet.common.events import Phase
from sandfleet.common.settings import Settings
from sandfleet.gateway.client import Client, EventStream
from tests.support import until_phase, until_terminal
from tests.support.cli import run_sandfleet, sandfleet, sandfleet_env, spawn_sandfleet
from tests.support.runtimes import WorkerFactory

pytestmark = pytest.mark.integration


async def test_submit_wait_exits_with_the_jobs_outcome(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    async with docker_worker():
        ok_rc, ok_out = await sandfleet(
            settings,
            "submit",
            "--json",
            "--wait",
            "--image",
            test_image,
            "--",
            "sh",
            "-c",
            "echo fine",
        )
        bad_rc, bad_out = await sandfleet(
            settings,
            "submit",
            "--wait",
            "--image",
            test_image,
            "--",
            "sh",
            "-c",
            "echo broke; exit 4",
        )
    assert ok_rc == 0, ok_out
    lines = [json.loads(line) for line in ok_out.splitlines()]
    assert lines[0]["status"] == "accepted"
    assert [line["phase"] for line in lines[1:]] == ["starting", "running", "succeeded"]
    assert lines[-1]["output"] == "fine\n"
    assert bad_rc == 1
    assert "failed" in bad_out and "exit=4" in bad_out and "| broke" in bad_out


async def test_submit_rejection_prints_field_paths_and_exits_2(
    settings: Settings, client: Client
) -> None:
    rc, out = await sandfleet(settings, "submit", "--image", "x", "--gpu-count", "0", "--", "true")
    assert rc == 2
    assert "rejected" in out
    assert "resource_requirements.gpu.count" in out


async def test_watch_from_start_and_status_replay_past_events(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    job_id = f"t-{uuid.uuid4().hex[:10]}"
    request = {"job_id": job_id, "template": {"image": test_image, "command": ["true"]}}
    async with docker_worker(), client.events(job_id=job_id) as stream:
        assert (await client.submit(request)).accepted
        await until_terminal(stream, job_id)

    # The job is over; watch must replay it from the log. Without --job, watch never
    # ends by itself, so read its lines until the job's terminal one, then stop it.
    watcher = await spawn_sandfleet(sandfleet_env(settings), "watch", "--from-start", "--json")
    assert watcher.stdout is not None
    phases: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not phases or not Phase(phases[-1]).is_terminal:
                event = json.loads(await watcher.stdout.readline())
                if event["job_id"] == job_id:
                    phases.append(event["phase"])
    finally:
        watcher.terminate()
        await watcher.wait()
    assert phases == ["accepted", "starting", "running", "succeeded"]

    rc, out = await sandfleet(settings, "status", job_id, "--json")
    assert rc == 0
    status = json.loads(out)
    assert status["phase"] == "succeeded"
    assert [e["phase"] for e in status["events"]] == phases
    rc, out = await sandfleet(settings, "status", "no-such-job")
    assert rc == 4
    assert out == "sandfleet: no job 'no-such-job' in the event log\n"
    unknown = await run_sandfleet(sandfleet_env(settings), "status", "no-such-job", "--json")
    assert unknown.returncode == 4  # and still its one document
    assert json.loads(unknown.stdout) == {"job_id": "no-such-job", "phase": None, "events": []}


def job(image: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": f"t-{uuid.uuid4().hex[:10]}",
        "template": {"image": image, "command": ["sh", "-c", script]},
        **extra,
    }


async def test_version_is_the_installed_distributions() -> None:
    ran = await run_sandfleet(dict(os.environ), "--version")
    assert (ran.returncode, ran.stdout) == (0, f"sandfleet {version('sandfleet')}\n")


DEAD_BROKER = "amqp://guest:s3cr3t-pw@127.0.0.1:1/"


@pytest.mark.parametrize(
    "args",
    [
        ("submit", "--image", "x", "--", "true"),
        ("submit", "--wait", "--image", "x", "--", "true"),
        ("wait", "some-job"),
        ("watch",),
        ("status", "some-job", "--json"),
        ("workers",),
        ("cancel", "some-job", "--json"),
        ("gateway",),
        ("worker", "--driver", "docker"),
    ],
)
async def test_an_unreachable_broker_is_one_line_and_exit_3(args: tuple[str, ...]) -> None:
    env = {**os.environ, "SANDFLEET_BROKER_URL": DEAD_BROKER, "SANDFLEET_ALLOW_UNSIGNED_JOBS": "1"}
    ran = await run_sandfleet(env, *args)
    assert ran.returncode == 3, ran
    assert ran.stdout == ""
    assert ran.stderr == (
        "sandfleet: cannot reach the fleet at amqp://guest:***@127.0.0.1:1/: Connection refused\n"
    )


async def test_a_worker_with_no_trusted_keys_is_one_line_and_exit_78() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDFLEET_")}
    ran = await run_sandfleet({**env, "SANDFLEET_BROKER_URL": DEAD_BROKER}, "worker")
    assert ran.returncode == 78, ran
    assert ran.stderr.startswith("sandfleet: no trusted keys: set SANDFLEET_TRUSTED_KEYS")
    assert ran.stderr.count("\n") == 1


async def test_refused_credentials_are_one_line_and_exit_3(settings: Settings) -> None:
    url = settings.broker_url.replace("guest:guest@", "guest:not-the-password@")
    ran = await run_sandfleet(sandfleet_env(settings, SANDFLEET_BROKER_URL=url), "wait", "j")
    assert ran.returncode == 3
    assert ran.stderr.count("\n") == 1
    assert "guest:***@127.0.0.1:5672/" in ran.stderr and "not-the-password" not in ran.stderr
    assert "refused the login" in ran.stderr


async def test_wait_exits_by_the_jobs_outcome(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    good, bad = job(test_image, "echo fine"), job(test_image, "exit 7")
    running = job(test_image, "sleep 1; echo late")
    async with docker_worker(slots=3):
        for request in (good, bad):
            await client.run(request, timeout=60)  # both over before `wait` starts
        assert (await client.submit(running)).accepted
        env = sandfleet_env(settings)
        ran_good, ran_bad, ran_running, ran_unknown = await asyncio.gather(
            run_sandfleet(env, "wait", good["job_id"], "--json"),
            run_sandfleet(env, "wait", bad["job_id"]),
            run_sandfleet(env, "wait", running["job_id"], "--json"),
            run_sandfleet(env, "wait", "no-such-job"),
        )
    assert ran_good.returncode == 0
    [outcome] = ran_good.json_lines
    assert (outcome["job_id"], outcome["phase"], outcome["output"]) == (
        good["job_id"],
        "succeeded",
        "fine\n",
    )
    assert ran_bad.returncode == 1
    assert "failed" in ran_bad.stdout and "exit=7" in ran_bad.stdout
    assert ran_running.returncode == 0
    assert [e["output"] for e in ran_running.json_lines] == ["late\n"]
    assert (ran_unknown.returncode, ran_unknown.stdout) == (4, "")
    assert ran_unknown.stderr == "sandfleet: no job 'no-such-job' in the event log\n"


async def test_wait_timeout_exits_124(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    long = job(test_image, "sleep 60")
    async with docker_worker(), client.events(job_id=long["job_id"]) as stream:
        assert (await client.submit(long)).accepted
        await until_phase(stream, long["job_id"], Phase.RUNNING)
        ran = await run_sandfleet(
            sandfleet_env(settings), "wait", long["job_id"], "--timeout", "0.5"
        )
        await client.cancel(long["job_id"])
        await until_terminal(stream, long["job_id"])
    assert (ran.returncode, ran.stdout) == (124, "")
    assert ran.stderr == f"sandfleet: job {long['job_id']} did not end within 0.5 s\n"


async def test_watch_job_ends_with_the_jobs_terminal_event(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    good, bad = job(test_image, "echo ok"), job(test_image, "exit 3")
    env = sandfleet_env(settings)
    async with docker_worker(slots=2):
        # --from-start: the watch sees the whole job whether it subscribes before or
        # after the submission, so the test need not know when it has subscribed.
        watches = [
            asyncio.create_task(
                run_sandfleet(env, "watch", "--job", j["job_id"], "--from-start", "--json")
            )
            for j in (good, bad)
        ]
        for request in (good, bad):
            assert (await client.submit(request)).accepted
        watched_good, watched_bad = await asyncio.gather(*watches)
    assert watched_good.returncode == 0, watched_good
    assert [e["phase"] for e in watched_good.json_lines] == [
        "accepted",
        "starting",
        "running",
        "succeeded",
    ]
    assert watched_bad.returncode == 1
    assert watched_bad.json_lines[-1]["phase"] == "failed"


async def test_watch_job_of_a_job_that_has_ended_ends_at_once(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    done = job(test_image, "exit 3")
    async with docker_worker():
        await client.run(done, timeout=60)
    env = sandfleet_env(settings)
    live_only, replayed = await asyncio.gather(
        run_sandfleet(env, "watch", "--job", done["job_id"], "--json"),
        run_sandfleet(env, "watch", "--job", done["job_id"], "--from-start", "--json"),
    )
    assert (live_only.returncode, live_only.stdout) == (1, "")  # nothing new: over already
    assert [e["phase"] for e in replayed.json_lines][-1] == "failed"


async def test_a_zero_is_a_flag_given_and_a_zero_wait_timeout_a_usage_error(
    settings: Settings, tmp_path: Path
) -> None:
    request = tmp_path / "job.json"
    request.write_text('{"template": {"image": "x"}}')
    env = sandfleet_env(settings)
    both = await run_sandfleet(env, "submit", "-f", str(request), "--timeout", "0")
    assert both.returncode == 2 and "not both" in both.stderr
    zero = await run_sandfleet(env, "wait", "some-job", "--timeout", "0")
    assert zero.returncode == 2


async def test_markup_in_event_text_prints_literally(settings: Settings, client: Client) -> None:
    # A reserved label key is rejected, and the rejection quotes the key back.
    request: dict[str, Any] = {
        "job_id": f"t-{uuid.uuid4().hex[:10]}",
        "labels": {"sandfleet.[/bold]": "[red]x[link=y]"},
        "template": {"image": "[/]", "command": ["true"]},
    }
    reply = await client.submit(request)
    assert not reply.accepted and "[/bold]" in reply.errors[0].message
    # Wide enough that rich folds no line of the status table (it folds, never cuts).
    env, job_id = sandfleet_env(settings, COLUMNS="400"), request["job_id"]
    plain = await run_sandfleet(env, "watch", "--job", job_id, "--from-start")
    as_json = await run_sandfleet(env, "watch", "--job", job_id, "--from-start", "--json")
    status = await run_sandfleet(env, "status", job_id)
    submitted = await run_sandfleet(env, "submit", "-f", "-", stdin=json.dumps(request).encode())
    for ran in (plain, status, submitted):
        assert "sandfleet.[/bold]" in ran.stdout, ran
        assert "Traceback" not in ran.stderr
    assert (plain.returncode, status.returncode, submitted.returncode) == (2, 0, 2)
    assert as_json.returncode == 2
    [event] = as_json.json_lines
    assert event["phase"] == "rejected" and "sandfleet.[/bold]" in event["message"]


async def test_submit_a_yaml_job_file_and_wait(
    settings: Settings,
    client: Client,
    docker_worker: WorkerFactory,
    test_image: str,
    tmp_path: Path,
) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"# a comment, which JSON cannot have\n"
        f"template:\n"
        f"  image: {test_image}\n"
        f"  command: [sh, -c, 'echo from yaml']\n"
        f"labels:\n"
        f"  team: ml\n"
    )
    async with docker_worker():
        ran = await run_sandfleet(
            sandfleet_env(settings), "submit", "-f", str(job_file), "--wait", "--json"
        )
    assert ran.returncode == 0, ran
    reply, *events = ran.json_lines
    assert reply["status"] == "accepted"
    assert [e["phase"] for e in events] == ["starting", "running", "succeeded"]
    assert events[-1]["output"] == "from yaml\n"


async def test_a_bad_job_file_is_a_usage_error(settings: Settings, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yml"
    bomb.write_text("a: &a [x, x]\nb: [*a, *a]\ntemplate: {image: x}\n")
    ran = await run_sandfleet(sandfleet_env(settings), "submit", "-f", str(bomb))
    assert ran.returncode == 2
    assert "anchors and aliases are not allowed" in ran.stderr


async def until_all_running(stream: EventStream, job_ids: set[str]) -> None:
    """Until every one of `job_ids` runs, in whatever order they start."""
    running: set[str] = set()
    async with asyncio.timeout(60):
        async for event in stream:
            if event.phase is Phase.RUNNING and event.job_id in job_ids:
                running.add(event.job_id)
            if running == job_ids:
                return


async def test_cancel_prints_one_json_document(
    settings: Settings, client: Client, docker_worker: WorkerFactory, test_image: str
) -> None:
    long, other = job(test_image, "sleep 60"), job(test_image, "sleep 60")
    env = sandfleet_env(settings)
    async with docker_worker(slots=2), client.events() as stream:
        for request in (long, other):
            assert (await client.submit(request)).accepted
        await until_all_running(stream, {long["job_id"], other["job_id"]})
        sent = await run_sandfleet(env, "cancel", long["job_id"], "--json")
        waited = await run_sandfleet(env, "cancel", other["job_id"], "--json", "--wait")
        await until_terminal(stream, long["job_id"])
    assert sent.returncode == 0
    assert json.loads(sent.stdout) == {"job_id": long["job_id"], "cancel_requested": True}
    assert waited.returncode == 0
    requested, outcome = waited.json_lines
    assert requested == {"job_id": other["job_id"], "cancel_requested": True}
    assert (outcome["job_id"], outcome["phase"]) == (other["job_id"], "cancelled")


async def test_ctrl_c_ends_a_command_quietly_with_130(settings: Settings, client: Client) -> None:
    assert not (await client.submit({"template": {"image": "x"}})).accepted  # one event
    watcher = await spawn_sandfleet(sandfleet_env(settings), "watch", "--from-start", "--json")
    assert watcher.stdout is not None and watcher.stderr is not None
    async with asyncio.timeout(30):
        assert json.loads(await watcher.stdout.readline())["phase"] == "rejected"
        watcher.send_signal(signal.SIGINT)
        assert await watcher.wait() == 130
    assert await watcher.stderr.read() == b""


async def test_shell_completion_completes_commands() -> None:
    # Through the installed script: completion is keyed to the program's name.
    script = Path(sys.executable).with_name("sandfleet")
    env = {**os.environ, "_SANDFLEET_COMPLETE": "complete_bash", "COMP_WORDS": "sandfleet wa"}
    process = await asyncio.create_subprocess_exec(
        script, env={**env, "COMP_CWORD": "1"}, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert (process.returncode, out.split()) == (0, [b"wait", b"watch"])
