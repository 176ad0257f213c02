"""The `sandfleet` command run as a person runs it: a subprocess on the test's broker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from sandfleet.common.settings import Settings


@dataclass(frozen=True)
class Ran:
    """A finished `sandfleet` command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def json_lines(self) -> list[Any]:
        """stdout as `--json` streams print it: one object per line."""
        return [json.loads(line) for line in self.stdout.splitlines()]


def sandfleet_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment a `sandfleet` command run for this test's broker and host gets."""
    return {
        **os.environ,
        "SANDFLEET_BROKER_URL": settings.broker_url,
        "SANDFLEET_HOST": settings.host,
        "SANDFLEET_TRUSTED_KEYS": settings.trusted_keys,
        "SANDFLEET_VIEW_PATH": str(settings.view_path),
        **({"SANDFLEET_SIGNING_KEY": str(settings.signing_key)} if settings.signing_key else {}),
        **overrides,
    }


async def spawn_sandfleet(
    env: dict[str, str], *args: str, stdin: int | None = None
) -> asyncio.subprocess.Process:
    """`python -m sandfleet ARGS` with stdout and stderr piped apart."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandfleet", *args,
        env=env, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run_sandfleet(
    env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 60
) -> Ran:
    """Run `sandfleet ARGS` to its end (at most `timeout` seconds)."""
    process = await spawn_sandfleet(
        env, *args, stdin=None if stdin is None else asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate(stdin)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def sandfleet(settings: Settings, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run `sandfleet ARGS` against this test's broker: exit code, stdout + stderr."""
    ran = await run_sandfleet(sandfleet_env(settings), *args, stdin=stdin)
    return ran.returncode, ran.stdout + ran.stderr
