"""A small round of bench/fuzz.py's inputs through decode + admit, so the bench and its
oracle keep working (the bench runs 100,000)."""

from __future__ import annotations

import pytest

from sandfleet.common.settings import Settings
from tests.support.fuzzing import FuzzReport, check_submission, fuzz_round, violations


def test_a_round_of_fuzzed_submissions_finds_nothing() -> None:
    report = fuzz_round(2000, seed=20261127, settings=Settings(host="fuzz"))
    assert report.tried == 2000
    assert (report.uncaught, report.accepted_invalid, report.oversized_rejections) == ([], [], [])
    # The mix exercises every outcome, not just one.
    assert min(report.accepted, report.undecodable, report.invalid) > 100


def test_the_oracle_knows_the_rules() -> None:
    settings = Settings(host="fuzz")
    ok = {"template": {"image": "x", "timeout_seconds": 604800}}
    assert violations(ok, settings) == []
    assert violations({"template": {"image": "x", "timeout_seconds": 604801}}, settings) == [
        "template.timeout_seconds"
    ]
    resources = {"cpu": 1e-10, "memory": "1e400Gi", "gpu": {"count": True}}
    assert violations(
        {"resource_requirements": resources, "template": ok["template"]}, settings
    ) == [
        "resource_requirements.cpu",
        "resource_requirements.memory",
        "resource_requirements.gpu.count",
    ]


def test_an_uncaught_exception_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def overflowing_admit(body: bytes, settings: Settings) -> None:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr("tests.support.fuzzing.admit", overflowing_admit)
    report = FuzzReport()
    check_submission(b'{"template": {"image": "x"}}', Settings(host="fuzz"), report)
    assert len(report.uncaught) == 1 and "OverflowError" in report.uncaught[0]
