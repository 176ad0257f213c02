"""The in-memory driver keeps the driver contract, so the runtime's unit tests (which run
on it) test what real drivers do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sandfleet_inmemory import InMemoryDriver

from sandfleet.common.models import Job
from sandfleet.workers.drivers.base import SandboxDriver
from sandfleet.workers.drivers.contract import DriverContract, JobMaker


class TestInMemoryContract(DriverContract):
    @pytest.fixture
    async def driver(self) -> AsyncIterator[SandboxDriver[Any]]:
        made = InMemoryDriver()
        yield made
        await made.aclose()

    @pytest.fixture
    def make_job(self) -> JobMaker:
        def make(job_id: str, *, line: str, exit_code: int = 0, run_seconds: float = 0) -> Job:
            block = {"output": f"{line}\n", "exit_code": exit_code, "run_seconds": run_seconds}
            template = {"image": "none", "driver_config": block}
            body = {"job_id": job_id, "driver": "inmemory", "template": template}
            return Job.model_validate_json(json.dumps(body))

        return make
