"""Percentiles of the time jobs spent in each stage of their lives (common.events.STAGES),
over the fleet and per driver and host, from the `timings` of the jobs' terminal events."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable

from sandfleet.common.events import STAGES
from sandfleet.common.view_queries import FleetStats, StageStats

Samples = dict[str, list[float]]  # stage → seconds


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `ordered` (sorted, not empty): a value it holds."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def stage_stats(samples: Samples) -> dict[str, StageStats]:
    """Each stage's percentiles, in STAGES order; stages with no sample are left out."""
    stats: dict[str, StageStats] = {}
    for stage in STAGES:
        values = sorted(samples.get(stage, ()))
        if values:
            stats[stage] = StageStats(
                count=len(values),
                p50=percentile(values, 0.50),
                p95=percentile(values, 0.95),
                p99=percentile(values, 0.99),
            )
    return stats


def fleet_stats(rows: Iterable[tuple[str, str, str]]) -> FleetStats:
    """Stats from (driver, host, timings JSON) rows; unknown stages and bad values are
    left out (a worker's timings are its word, not the gateway's)."""
    overall: Samples = defaultdict(list)
    by_driver: dict[str, Samples] = defaultdict(lambda: defaultdict(list))
    by_host: dict[str, Samples] = defaultdict(lambda: defaultdict(list))
    jobs = 0
    for driver, host, timings_json in rows:
        jobs += 1
        for stage, seconds in _valid_timings(timings_json):
            for samples in (overall, by_driver[driver], by_host[host]):
                samples[stage].append(seconds)
    return FleetStats(
        jobs=jobs,
        stages=stage_stats(overall),
        by_driver={name: stage_stats(s) for name, s in sorted(by_driver.items())},
        by_host={name: stage_stats(s) for name, s in sorted(by_host.items())},
    )


def _valid_timings(timings_json: str) -> Iterable[tuple[str, float]]:
    timings = json.loads(timings_json)
    if not isinstance(timings, dict):
        return
    for stage, seconds in timings.items():
        numeric = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        if stage in STAGES and numeric and math.isfinite(seconds) and seconds >= 0:
            yield stage, float(seconds)
