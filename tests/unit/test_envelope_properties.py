"""Properties of the gateway's front door over generated input: whatever arrives, decode
and admit accept it or refuse it with MessageUndecodable / RequestInvalid (never another
exception, which would requeue it as poison), the refusal is small, and an accepted job
keeps every rule (judged by tests/support/fuzzing.py's independent oracle)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.errors import RequestInvalid
from sandfleet.common.settings import Settings
from sandfleet.gateway.envelope import admit
from tests.support.fuzzing import FuzzReport, check_submission

SETTINGS = Settings(host="gw", max_driver_config_bytes=4096)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

# Values near and past each bound, of the right type and not.
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.sampled_from([0, 1, 64, 65, 604800, 604801, 6 * 2**20, 16 * 2**40, 16 * 2**40 + 1]),
    st.sampled_from([0.01, 0.0099, 1024, 1024.001, 1e-10, 1e308]),
)
quantities = st.from_regex(r"\A ?[0-9]{1,25}(\.[0-9]{1,12})? ?(m|k|K|M|G|T|Ki|Mi|Gi|Ti|e3|)\Z")
anything = st.one_of(numbers, quantities, json_values)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


near_valid_requests = st.fixed_dictionaries(
    {
        "template": st.fixed_dictionaries(
            {"image": st.one_of(st.just("busybox"), st.text(max_size=520))},
            optional={
                "timeout_seconds": numbers,
                "command": st.lists(st.text(max_size=5), max_size=3) | anything,
                "environment": st.dictionaries(st.text(max_size=8), st.text(max_size=3)),
                "labels": st.dictionaries(st.text(max_size=12), st.text(max_size=3)),
                "driver_config": st.dictionaries(
                    st.sampled_from(["docker", "vm", "x"]), json_values, max_size=3
                ),
            },
        )
    },
    optional={
        "job_id": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,70}\Z") | anything,
        "driver": st.sampled_from(["docker", "vm", "Kube", "a" * 33]) | anything,
        "placement": optional(host=st.text(max_size=70) | anything),
        "labels": st.dictionaries(st.text(max_size=12), st.text(max_size=3) | numbers),
        "resource_requirements": optional(
            cpu=numbers | quantities,
            memory=numbers | quantities,
            gpu=optional(count=numbers) | anything,
        ),
    },
)


def assert_clean(body: bytes) -> None:
    report = FuzzReport()
    check_submission(body, SETTINGS, report)
    assert (report.uncaught, report.accepted_invalid, report.oversized_rejections) == ([], [], [])


@given(st.binary(max_size=4000))
def test_any_bytes(body: bytes) -> None:
    assert_clean(body)


@given(json_values)
def test_any_json(value: Any) -> None:
    assert_clean(json.dumps(value).encode())


@given(near_valid_requests, st.booleans())
def test_near_valid_requests(request: dict[str, Any], ascii_only: bool) -> None:
    assert_clean(json.dumps(request, ensure_ascii=ascii_only).encode())


@given(st.binary(max_size=2000))
def test_admit_alone_refuses_only_with_request_invalid(body: bytes) -> None:
    # admit is safe without decode before it: anything not a request is RequestInvalid.
    try:
        admit(body, SETTINGS)
    except RequestInvalid as exc:
        assert exc.errors and all(e.field for e in exc.errors)


@given(st.integers(min_value=4301, max_value=6000), st.sampled_from(["", "-"]))
def test_giant_integers_anywhere(digits: int, sign: str) -> None:
    giant = sign + "9" * digits
    for raw in [
        f'{{"template": {{"image": "x", "timeout_seconds": {giant}}}}}',
        f'{{"template": {{"image": "x"}}, "labels": [{giant}]}}',
        f'{{"resource_requirements": {{"memory": {giant}}}, "template": {{"image": "x"}}}}',
    ]:
        assert_clean(raw.encode())
