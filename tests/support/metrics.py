"""Reading a Prometheus registry back as a scrape would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families


def scraped(registry: CollectorRegistry) -> dict[tuple[str, tuple[str, ...]], float]:
    """Every sample of `registry`'s text exposition: (name, sorted "k=v" labels) → value."""
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {
        (sample.name, tuple(f"{k}={v}" for k, v in sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }
