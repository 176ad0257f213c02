from __future__ import annotations

import pytest

from sandfleet.common.quantities import cpu_cores, memory_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("512Mi", 512 * 2**20),
        ("4Gi", 4 * 2**30),
        ("1G", 10**9),
        ("1.5Ki", 1536),
    ],
)
def test_memory(text: str, expected: int) -> None:
    assert memory_bytes(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("2", 2.0), ("500m", 0.5), ("0.25", 0.25)])
def test_cpu(text: str, expected: float) -> None:
    assert cpu_cores(text) == expected


def test_non_strings_pass_through_for_the_schema() -> None:
    assert memory_bytes(1024) == 1024
    assert cpu_cores(1.5) == 1.5


@pytest.mark.parametrize("bad", ["4Zi", "-1", "1e3", ""])
def test_bad_memory(bad: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        memory_bytes(bad)
