"""The code stays in pieces a reader can hold: issue 9's targets for sandfleet's own
modules (common/, gateway/, workers/, src/sandfleet/)."""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
MAX_MEDIAN_FUNCTION_LINES = 15


def modules() -> list[Path]:
    folders = [ROOT / "common", ROOT / "gateway", ROOT / "workers"]
    return [
        *(p for f in folders for p in f.rglob("*.py")),
        *(ROOT / "src" / "sandfleet").glob("*.py"),
    ]


def function_lengths() -> dict[str, int]:
    lengths = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                lengths[where] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_is_over_60_lines() -> None:
    assert {f: n for f, n in function_lengths().items() if n > MAX_FUNCTION_LINES} == {}


def test_no_module_is_over_400_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules()}
    assert {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_the_median_function_is_short() -> None:
    assert statistics.median(function_lengths().values()) <= MAX_MEDIAN_FUNCTION_LINES
