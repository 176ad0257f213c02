"""deploy/: the Prometheus config and the Grafana dashboard parse, and the dashboard asks
only for metrics the gateway and workers export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from sandfleet.gateway.metrics import GatewayMetrics
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.gpu.inventory import GpuInventory
from sandfleet.workers.metrics import WorkerMetrics
from sandfleet.workers.slots import Slots

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def exported(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can give (histograms' _bucket/_sum/_count included)."""
    names = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_the_dashboard_asks_only_for_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    asked = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bsandfleet_[a-z_]+", target["expr"])
    }
    worker = WorkerMetrics(Slots(1), GpuInventory((), source="test"), GpuClaimStore(tmp_path))
    known = exported(GatewayMetrics().registry) | exported(worker.registry)
    assert asked, "the dashboard has no sandfleet panels"
    assert asked <= known, f"not exported: {sorted(asked - known)}"


def test_the_scrape_config_names_the_gateway_and_workers() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"sandfleet-gateway", "sandfleet-workers"}
