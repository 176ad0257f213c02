"""A worker's Prometheus metrics.

    sandfleet_jobs_total{phase,driver,host}             terminal events it published
    sandfleet_job_stage_seconds{stage,driver}           their `timings`, as histograms
    sandfleet_worker_slots{state}                       running, queued, free
    sandfleet_gpus{state}                               free (claimable whole now),
                                                        mig (in MIG mode, none of it
                                                        held), held, unhealthy,
                                                        drained (these two may count
                                                        held GPUs too)
    sandfleet_gpu_holder_info{gpu,job}                  1 for each GPU a job holds
    sandfleet_warm_sandboxes{pool,image,state}          per warm pool: ready, target
    sandfleet_job_starts_total{start}                   jobs started warm, or cold

GPUs are the host's, as its claim store says: every driver's claims, not only this
worker's (a GPU held by another driver's job is not free for this one either).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sandfleet.common.amqp import EventSink
from sandfleet.common.events import Event
from sandfleet.workers.gpu.claims import GpuClaimStore
from sandfleet.workers.gpu.inventory import GpuInventory
from sandfleet.workers.slots import Slots
from sandfleet.workers.warm_pools import WarmPools

# From a quick `true` to a day-long training run.
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class JobMetrics:
    """What the worker's terminal events say: counted by phase, timed by stage."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "sandfleet_jobs",
            "Jobs ended on this worker, by terminal phase",
            ["phase", "driver", "host"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "sandfleet_job_stage_seconds",
            "Seconds jobs spent in each stage of their life (queued, gpu_wait, creating, "
            "starting, running)",
            ["stage", "driver"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )

    def observe(self, event: Event) -> None:
        if not event.phase.is_terminal:
            return
        driver = event.driver or "none"
        self.jobs.labels(phase=event.phase.value, driver=driver, host=event.host).inc()
        for stage, seconds in (event.timings or {}).items():
            self.stage_seconds.labels(stage=stage, driver=driver).observe(seconds)


class CountedEvents:
    """An `EventSink` that counts each event it publishes in `metrics`, once published."""

    def __init__(self, sink: EventSink, metrics: JobMetrics) -> None:
        self._sink = sink
        self._metrics = metrics

    async def publish(self, event: Event) -> None:
        await self._sink.publish(event)
        self._metrics.observe(event)


class WorkerState(Collector):
    """Slots, GPUs and warm pools as they are at each scrape."""

    def __init__(
        self,
        slots: Slots,
        inventory: GpuInventory,
        claims: GpuClaimStore,
        warm: WarmPools | None = None,
    ) -> None:
        self._slots = slots
        self._inventory = inventory
        self._claims = claims
        self._warm = warm

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        slots = GaugeMetricFamily(
            "sandfleet_worker_slots", "This worker's job slots, by state", labels=["state"]
        )
        slots.add_metric(["running"], self._slots.running)
        slots.add_metric(["queued"], self._slots.queued)
        slots.add_metric(["free"], self._slots.free)
        yield slots
        yield from self._gpus()
        yield from self._warm_pools()

    def _warm_pools(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sandboxes = GaugeMetricFamily(
            "sandfleet_warm_sandboxes",
            "This worker's warm sandboxes, per pool: ready to take, and the pool's target",
            labels=["pool", "image", "state"],
        )
        if self._warm is None:
            return
        for pool in self._warm.pools:
            sandboxes.add_metric([pool.key, pool.profile.image, "ready"], len(pool.ready))
            sandboxes.add_metric([pool.key, pool.profile.image, "target"], pool.profile.count)
        yield sandboxes
        starts = CounterMetricFamily(
            "sandfleet_job_starts",
            "Jobs this worker started in a warm sandbox, or in one it made for them",
            labels=["start"],
        )
        starts.add_metric(["warm"], self._warm.served_warm)
        starts.add_metric(["cold"], self._warm.served_cold)
        yield starts

    def _gpus(self) -> Iterator[GaugeMetricFamily]:
        on_host = {gpu.uuid for gpu in self._inventory}
        holders = {
            gpu: claim.job_id
            for claim in self._claims.claims()
            for gpu in claim.physical  # a GPU one of whose MIG instances is held counts held
            if gpu in on_host
        }
        states = self._claims.states()
        unavailable = on_host & states.unavailable().keys()
        idle = on_host - holders.keys() - unavailable
        # A GPU in MIG mode is claimed by instance only: not free to a count-only job.
        mig = {gpu.uuid for gpu in self._inventory if gpu.mig_enabled}
        gpus = GaugeMetricFamily("sandfleet_gpus", "This host's GPUs, by state", labels=["state"])
        gpus.add_metric(["free"], len(idle - mig))
        gpus.add_metric(["mig"], len(idle & mig))
        gpus.add_metric(["held"], len(holders))
        gpus.add_metric(["unhealthy"], len(on_host & states.unhealthy.keys()))
        gpus.add_metric(["drained"], len(on_host & states.drained.keys()))
        yield gpus
        info = GaugeMetricFamily(
            "sandfleet_gpu_holder_info", "The job holding each held GPU", labels=["gpu", "job"]
        )
        for gpu, job_id in sorted(holders.items()):
            info.add_metric([gpu, job_id], 1)
        yield info


class WorkerMetrics:
    """The worker's registry, its own (not the process's global one)."""

    def __init__(
        self,
        slots: Slots,
        inventory: GpuInventory,
        claims: GpuClaimStore,
        warm: WarmPools | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.jobs = JobMetrics(self.registry)
        self.registry.register(WorkerState(slots, inventory, claims, warm))
