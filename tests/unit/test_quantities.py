from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandfleet.common.quantities import (
    MAX_CPU_CORES,
    MAX_MEMORY_BYTES,
    MIN_CPU_CORES,
    MIN_MEMORY_BYTES,
    cpu_cores,
    cpu_in_range,
    memory_bytes,
    memory_in_range,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8388608", 8388608),
        ("512Mi", 512 * 2**20),
        ("4Gi", 4 * 2**30),
        ("1G", 10**9),
        ("6.5Mi", 6815744),
        (" 16Ti ", 16 * 2**40),
        ("6Mi", 6 * 2**20),
    ],
)
def test_memory(text: str, expected: int) -> None:
    assert memory_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("2", 2.0), ("500m", 0.5), ("0.25", 0.25), ("10m", 0.01), ("1024", 1024)]
)
def test_cpu(text: str, expected: float) -> None:
    assert cpu_cores(text) == expected


def test_non_strings_pass_through_for_the_schema() -> None:
    assert memory_bytes(1024) == 1024
    assert cpu_cores(1.5) == 1.5


@pytest.mark.parametrize(
    "bad", ["4Zi", "-1", "1e3", "", "1e400Gi", "\u0661\u0662Mi", "inf", "NaN", "0x10Mi"]
)
def test_bad_memory(bad: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        memory_bytes(bad)


@pytest.mark.parametrize("bad", ["-1", "1e-10", "", "inf", "nan", "\u0662", "1e3m"])
def test_bad_cpu(bad: str) -> None:
    with pytest.raises(ValueError, match="not a CPU quantity"):
        cpu_cores(bad)


@pytest.mark.parametrize(
    "huge", ["9" * 400 + "Gi", "9" * 5000, "1" + "0" * 1_000_000 + "Ti", "16.0000001Ti", "5Mi", "0"]
)
def test_memory_out_of_range_is_refused_without_overflow(huge: str) -> None:
    # Before: float("9"*400) is inf, and int(inf) raised OverflowError, which pydantic
    # does not turn into a validation error: the gateway requeued the message.
    with pytest.raises(ValueError, match=r"out of range: memory must be between 6Mi and 16Ti"):
        memory_bytes(huge)


@pytest.mark.parametrize("bad", ["0", "9m", "0.001", "1025", "9" * 5000 + "m", "1" + "0" * 400])
def test_cpu_out_of_range(bad: str) -> None:
    with pytest.raises(ValueError, match=r"out of range: cpu must be between 0.01 \(10m\)"):
        cpu_cores(bad)


@pytest.mark.parametrize("bad", [0.0, 1e-10, 0.0099, 1024.5, math.inf, -math.inf, math.nan])
def test_cpu_range(bad: float) -> None:
    with pytest.raises(ValueError, match="must be between"):
        cpu_in_range(bad)
    assert cpu_in_range(MIN_CPU_CORES) == MIN_CPU_CORES
    assert cpu_in_range(MAX_CPU_CORES) == MAX_CPU_CORES


@pytest.mark.parametrize("bad", [0, MIN_MEMORY_BYTES - 1, MAX_MEMORY_BYTES + 1, 10**4000])
def test_memory_range(bad: int) -> None:
    with pytest.raises(ValueError, match="must be between"):
        memory_in_range(bad)
    assert memory_in_range(MIN_MEMORY_BYTES) == MIN_MEMORY_BYTES


def test_a_long_input_is_cut_short_in_the_message() -> None:
    with pytest.raises(ValueError) as caught:
        memory_bytes("x" * 100_000)
    assert len(str(caught.value)) < 200
    assert "100000 characters" in str(caught.value)


@given(st.text(max_size=60))
def test_any_text_is_a_quantity_in_range_or_a_value_error(text: str) -> None:
    for parse, low, high in (
        (memory_bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES),
        (cpu_cores, MIN_CPU_CORES, MAX_CPU_CORES),
    ):
        try:
            value = parse(text)
        except ValueError:
            continue
        assert isinstance(value, int | float) and low <= value <= high


@given(
    st.decimals(min_value=0, max_value=10**20, allow_nan=False, places=6),
    st.sampled_from(["", "k", "K", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"]),
)
def test_memory_is_exact(number: object, unit: str) -> None:
    scale = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    exact = number * scale[unit]  # type: ignore[operator]
    text = f"{number:f}{unit}"
    if MIN_MEMORY_BYTES <= exact <= MAX_MEMORY_BYTES:
        assert memory_bytes(text) == int(exact)
    else:
        with pytest.raises(ValueError, match="out of range"):
            memory_bytes(text)
