"""bench/gateway_throughput.py's arithmetic (tests/support/throughput_goals): the broker
limit, the ratios and issue 15's goals, met, missed or not measurable."""

from __future__ import annotations

from rich.console import Console

from tests.support.throughput_goals import (
    Figure,
    Results,
    Scenario,
    Startup,
    goals,
    goals_table,
    rates_table,
    ratio,
    startup_table,
)


def startup(restart: float) -> Startup:
    return Startup(
        events=1_000_000,
        fill_rate=5000.0,
        empty_seconds=1.5,
        cold_seconds=40.0,
        restart_seconds=restart,
        cold_rss_mib=300.0,
        restart_rss_mib=120.0,
    )


def results(**rates: float | None) -> Results:
    figures = {Scenario(name): Figure(rate) for name, rate in rates.items()}
    return Results(figures=figures, heartbeat_rate=1000.0, startup=startup(1.5))


def with_cpu(run: Results, single_ms: float, heartbeats_ms: float) -> Results:
    """`run` with the gateway's CPU per job measured, without and with heartbeats."""
    for scenario, cpu_ms in ((Scenario.SINGLE, single_ms), (Scenario.HEARTBEATS, heartbeats_ms)):
        run.figures[scenario] = Figure(run.rate(scenario), cpu_ms=cpu_ms, broker_cpu_ms=0.5)
    return run


def rendered(table: object) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_the_broker_limit_is_a_third_of_the_raw_rate() -> None:
    assert results(raw=6000.0).rate(Scenario.LIMIT) == 2000.0
    assert results().rate(Scenario.LIMIT) is None
    assert ratio(1600.0, 2000.0) == 0.8
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_goals_met_at_their_thresholds() -> None:
    run = results(raw=6000.0, celery=900.0, single=1600.0, batched=2700.0, heartbeats=1440.0)
    with_cpu(run, single_ms=1.0, heartbeats_ms=1.1)
    assert [goal.met for goal in goals(run)] == [True, True, True, True, True, True]


def test_goals_missed_just_below_their_thresholds() -> None:
    run = results(raw=6000.0, celery=900.0, single=899.0, batched=2699.0, heartbeats=809.0)
    with_cpu(run, single_ms=1.0, heartbeats_ms=1.11)
    run.startup = startup(2.01)
    met = [goal.met for goal in goals(run)]
    # 899 < 0.8 x 2000; 899 < 900; 2699 < 3 x 900; 809 < 0.9 x 899; 1.11 > 1.1 x 1.0 ms;
    # 2.01 s > 2 s
    assert met == [False, False, False, False, False, False]


def test_goals_without_their_figures_are_not_judged() -> None:
    run = results(raw=6000.0, single=1700.0, batched=None, heartbeats=1700.0)
    run.startup = None
    run.heartbeat_rate = 500.0  # too few heartbeats to put the goal to the test
    met = {goal.label: goal.met for goal in goals(run)}
    assert list(met.values()) == [True, None, None, None, None, None]
    assert "only 500/s" in rendered(goals_table(run))


def test_tables_show_rates_ratios_and_what_is_missing() -> None:
    run = with_cpu(results(raw=6000.0, celery=1000.0, single=1500.0), 1.25, 1.375)
    run.figures[Scenario.BATCHED] = Figure(missing="unsupported")
    text = rendered(rates_table(run))
    assert "1.25" in text and "1.38" in text and "0.50" in text  # CPU ms per job
    assert "6,000" in text and "2,000" in text  # raw, and the limit a third of it
    assert "0.75x" in text and "1.50x" in text  # single: x broker limit, x Celery
    assert "unsupported" in text
    assert "skipped" in text  # relay: not run
    assert "MISSED" in rendered(goals_table(run))
    assert "1.50 s" in rendered(startup_table(startup(1.5)))
