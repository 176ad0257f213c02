"""bench/gateway_throughput.py's arithmetic: each scenario's rate beside the broker's
limit and Celery, and issue 15's goals met or missed. Pure, so a unit test checks it
(tests import no bench/ module; the bench imports this one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from rich.table import Table

# Each admission is three confirmed publishes (the `accepted` event, the job, the reply)
# plus a delivery, so the broker's own limit for the gateway's work is a third of the
# raw confirmed-publish rate.
PUBLISHES_PER_JOB = 3
HEARTBEATS_PER_SECOND = 1000.0
SINGLE_VS_LIMIT = 0.8  # single-job admissions ≥ 0.8x the broker limit
BATCHED_VS_CELERY = 3.0  # batched admissions ≥ 3x Celery
HEARTBEAT_SLOWDOWN = 0.10  # with heartbeats flowing, within 10% of without
STARTUP_SECONDS = 2.0  # a restart with the big log answers within 2 s
# Below this share of the asked heartbeat rate, the heartbeat goal was not put to the test.
HEARTBEAT_RATE_FLOOR = 0.9


class Scenario(StrEnum):
    RAW = "raw"
    LIMIT = "limit"
    RELAY = "relay"
    CELERY = "celery"
    SINGLE = "single"
    BATCHED = "batched"
    HEARTBEATS = "heartbeats"
    TWO = "two"
    STARTUP = "startup"


LABELS = {
    Scenario.RAW: "raw: pipelined confirmed persistent publish, quorum queue",
    Scenario.LIMIT: f"broker limit for the gateway's work (raw ÷ {PUBLISHES_PER_JOB})",
    Scenario.RELAY: "naive relay (one message at a time: event, job, reply)",
    Scenario.CELERY: "Celery apply_async, confirms, quorum queue",
    Scenario.SINGLE: "gateway, single-job submissions",
    Scenario.BATCHED: "gateway, batched submissions",
    Scenario.HEARTBEATS: "gateway, single-job, 1,000 heartbeats/s flowing",
    Scenario.TWO: "two gateway processes, single-job",
}


@dataclass(frozen=True)
class Figure:
    """One scenario's outcome: a rate per second, or why there is none."""

    rate: float | None = None
    note: str = ""
    cpu_ms: float | None = None  # CPU ms per job of the processes that answered
    broker_cpu_ms: float | None = None  # the broker's CPU ms per job, where it is local
    missing: str = ""  # "unsupported", "skipped (...)", "failed: ...": why no rate


@dataclass(frozen=True)
class Startup:
    """The start-up scenario: seconds from a gateway's launch to its first reply."""

    events: int
    fill_rate: float
    empty_seconds: float
    cold_seconds: float
    restart_seconds: float
    cold_rss_mib: float
    restart_rss_mib: float


@dataclass
class Results:
    figures: dict[Scenario, Figure] = field(default_factory=dict)
    heartbeat_rate: float | None = None  # heartbeats/s actually published during the run
    startup: Startup | None = None
    failed: list[str] = field(default_factory=list)  # scenarios that raised

    def rate(self, scenario: Scenario) -> float | None:
        if scenario is Scenario.LIMIT:
            raw = self.rate(Scenario.RAW)
            return None if raw is None else raw / PUBLISHES_PER_JOB
        figure = self.figures.get(scenario)
        return None if figure is None else figure.rate


@dataclass(frozen=True)
class Goal:
    label: str
    met: bool | None  # None: this run could not tell
    detail: str


def ratio(rate: float | None, base: float | None) -> float | None:
    if rate is None or base is None or base <= 0:
        return None
    return rate / base


def _at_least(label: str, rate: float | None, base: float | None, times: float) -> Goal:
    share = ratio(rate, base)
    if share is None:
        return Goal(label, None, "not measured")
    return Goal(label, share >= times, f"{share:.2f}x")


def goals(results: Results) -> list[Goal]:
    single, celery = results.rate(Scenario.SINGLE), results.rate(Scenario.CELERY)
    limit = results.rate(Scenario.LIMIT)
    return [
        _at_least(f"single-job ≥ {SINGLE_VS_LIMIT}x broker limit", single, limit, SINGLE_VS_LIMIT),
        _at_least("single-job ≥ Celery", single, celery, 1.0),
        _at_least(
            f"batched ≥ {BATCHED_VS_CELERY:g}x Celery",
            results.rate(Scenario.BATCHED),
            celery,
            BATCHED_VS_CELERY,
        ),
        _heartbeat_goal(results),
        _heartbeat_cpu_goal(results),
        _startup_goal(results.startup),
    ]


def _heartbeat_goal(results: Results) -> Goal:
    label = f"with heartbeats within {HEARTBEAT_SLOWDOWN:.0%} of without"
    goal = _at_least(
        label, results.rate(Scenario.HEARTBEATS), results.rate(Scenario.SINGLE),
        1 - HEARTBEAT_SLOWDOWN,
    )  # fmt: skip
    beats = results.heartbeat_rate
    if goal.met is None or beats is None:
        return goal
    if beats < HEARTBEAT_RATE_FLOOR * HEARTBEATS_PER_SECOND:
        return Goal(label, None, f"{goal.detail}, but heartbeats flowed at only {beats:,.0f}/s")
    return Goal(label, goal.met, f"{goal.detail} at {beats:,.0f} heartbeats/s")


def _heartbeat_cpu_goal(results: Results) -> Goal:
    """What the rate goal stands for, without the heartbeat source's and the broker's
    share of a small machine's cores: the gateway's own CPU per admitted job."""
    label = f"gateway CPU/job with heartbeats within {HEARTBEAT_SLOWDOWN:.0%} of without"
    flowing, quiet = results.figures.get(Scenario.HEARTBEATS), results.figures.get(Scenario.SINGLE)
    if flowing is None or quiet is None or flowing.cpu_ms is None or quiet.cpu_ms is None:
        return Goal(label, None, "not measured")
    share = flowing.cpu_ms / quiet.cpu_ms
    detail = f"{flowing.cpu_ms:.2f} vs {quiet.cpu_ms:.2f} ms ({share:.2f}x)"
    return Goal(label, share <= 1 + HEARTBEAT_SLOWDOWN, detail)


def _startup_goal(startup: Startup | None) -> Goal:
    if startup is None:
        return Goal(f"restart ≤ {STARTUP_SECONDS:g} s with the log full", None, "not measured")
    label = f"restart ≤ {STARTUP_SECONDS:g} s with {startup.events:,} events in the log"
    seconds = startup.restart_seconds
    return Goal(label, seconds <= STARTUP_SECONDS, f"{seconds:.2f} s")


def _times(share: float | None) -> str:
    return "—" if share is None else f"{share:.2f}x"


def rates_table(results: Results) -> Table:
    table = Table(title="Admissions per second, one broker, one run")
    columns = ("scenario", "per second", "x broker limit", "x Celery", "CPU ms/job",
               "broker ms/job", "note")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in {"scenario", "note"} else "right")
    limit, celery = results.rate(Scenario.LIMIT), results.rate(Scenario.CELERY)
    for scenario, label in LABELS.items():
        if scenario is Scenario.LIMIT:
            figure = Figure(limit, "what three confirmed publishes a job allow")
        else:
            figure = results.figures.get(scenario, Figure(missing="skipped"))
        rate = figure.rate
        shown = f"{rate:,.0f}" if rate is not None else figure.missing
        table.add_row(
            label, shown, _times(ratio(rate, limit)), _times(ratio(rate, celery)),
            _ms(figure.cpu_ms), _ms(figure.broker_cpu_ms), figure.note,
        )  # fmt: skip
    table.caption = (
        "CPU ms/job: the answering processes' CPU (user + system) per job; broker ms/job:"
        " RabbitMQ's, where it runs on this machine (raw: per publish)"
    )
    return table


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def startup_table(startup: Startup) -> Table:
    table = Table(title=f"Gateway start-up, {startup.events:,} events in the log")
    for column in ("start", "to first reply", "RSS after"):
        table.add_column(column, justify="left" if column == "start" else "right")
    table.add_row("empty log", f"{startup.empty_seconds:.2f} s", "")
    table.add_row(
        "first (cold: reads the whole log)",
        f"{startup.cold_seconds:.2f} s",
        f"{startup.cold_rss_mib:,.0f} MiB",
    )
    table.add_row(
        "restart (its view kept)",
        f"{startup.restart_seconds:.2f} s",
        f"{startup.restart_rss_mib:,.0f} MiB",
    )
    table.caption = f"log filled at {startup.fill_rate:,.0f} events/s"
    return table


def goals_table(results: Results) -> Table:
    table = Table(title="Issue 15's goals")
    for column in ("goal", "", "measured"):
        table.add_column(column)
    marks = {True: "met", False: "MISSED", None: "n/a"}
    for goal in goals(results):
        table.add_row(goal.label, marks[goal.met], goal.detail)
    return table
