"""`sandfleet broker setup` and `sandfleet keys generate`, run as an operator runs them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aio_pika
import pytest

from sandfleet.common.settings import Settings
from tests.support.broker import rabbitmqctl, vhost_of
from tests.support.cli import Ran, run_sandfleet, sandfleet_env

pytestmark = pytest.mark.integration


async def setup(settings: Settings, credentials: Path, *args: str) -> Ran:
    env = sandfleet_env(settings, SANDFLEET_BROKER_CREDENTIALS=str(credentials))
    return await run_sandfleet(env, "broker", "setup", "--driver", "inmemory", *args)


async def test_broker_setup_prints_each_roles_url_and_is_idempotent(
    settings: Settings, tmp_path: Path
) -> None:
    credentials = tmp_path / "state" / "users.json"
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    try:
        first = await setup(settings, credentials, "--host", "h1", "--submitter", alice, "--json")
        again = await setup(settings, credentials, "--host", "h1", "--host", "h2",
                            "--submitter", alice, "--submitter", bob, "--json")  # fmt: skip
        rotated = await setup(settings, credentials, "--submitter", alice, "--rotate", "--json")
        new = json.loads(rotated.stdout)
        for url in (new["gateway"], new["submitters"][alice]):
            connection = await aio_pika.connect(url)  # each login works
            await connection.close()
    finally:
        for user in (alice, bob):
            rabbitmqctl("delete_user", user)
    assert (first.returncode, again.returncode, rotated.returncode) == (0, 0, 0), first.stderr
    urls, more = json.loads(first.stdout), json.loads(again.stdout)
    assert list(urls) == ["gateway", "observer", "admin", "workers", "submitters", "policies"]
    assert urls["policies"]["sandfleet-intake"]["definition"]["delivery-limit"] == (
        settings.job_delivery_limit
    )
    assert list(urls["workers"]) == ["h1"] and list(urls["submitters"]) == [alice]
    assert urls["workers"]["h1"].endswith(f"@127.0.0.1:5672/{vhost_of(settings.broker_url)}")
    # re-run: same passwords, new names added
    assert more["submitters"][alice] == urls["submitters"][alice]
    assert more["workers"]["h1"] == urls["workers"]["h1"] and set(more["workers"]) == {"h1", "h2"}
    assert new["submitters"][alice] != urls["submitters"][alice]
    assert credentials.stat().st_mode & 0o777 == 0o600
    assert credentials.parent.stat().st_mode & 0o777 == 0o700


async def test_broker_setup_refuses_a_reserved_name_and_explains_a_missing_api(
    settings: Settings, tmp_path: Path
) -> None:
    reserved = await setup(settings, tmp_path / "u.json", "--submitter", "sandfleet-admin")
    assert reserved.returncode == 2 and "reserved" in reserved.stderr
    env = sandfleet_env(
        settings,
        SANDFLEET_BROKER_CREDENTIALS=str(tmp_path / "u.json"),
        SANDFLEET_BROKER_ADMIN_URL="http://guest:guest@127.0.0.1:1/",
    )
    unreachable = await run_sandfleet(env, "broker", "setup")
    assert unreachable.returncode == 78
    assert "rabbitmq-plugins enable rabbitmq_management" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


async def test_keys_generate_writes_a_private_pair_once(settings: Settings, tmp_path: Path) -> None:
    made = await run_sandfleet(sandfleet_env(settings), "keys", "generate", str(tmp_path / "k"))
    again = await run_sandfleet(sandfleet_env(settings), "keys", "generate", str(tmp_path / "k"))
    assert made.returncode == 0 and "key id" in made.stdout
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert again.returncode == 2 and "never overwritten" in again.stderr


async def test_broker_setup_never_takes_over_a_user_it_did_not_make(
    settings: Settings, tmp_path: Path
) -> None:
    foreign = f"ops-{uuid.uuid4().hex[:6]}"
    rabbitmqctl("add_user", foreign, "their-own-password")
    rabbitmqctl("set_permissions", "-p", vhost_of(settings.broker_url), foreign, "", "", "")
    try:
        ran = await setup(settings, tmp_path / "u.json", "--submitter", foreign)
        url = settings.broker_url.replace("guest:guest@", f"{foreign}:their-own-password@")
        connection = await aio_pika.connect(url)  # its password is untouched
        await connection.close()
    finally:
        rabbitmqctl("delete_user", foreign)
    assert ran.returncode == 78, ran
    assert f"broker user '{foreign}' exists and is not one this set-up made" in ran.stderr
