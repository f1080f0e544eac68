"""``/metrics`` in Prometheus' text format, reachable without a login.

Two sources, read when scraped (docs/design.md, "Metrics"):

- the receiving processes' counters (`plugin.ingest.counters`: instances stored, received again and
  refused, associations refused, bytes), summed from their files by prometheus_client's
  ``MultiProcessCollector``;
- `NodeCollector`: what the job store knows (the work in flight by state, the queue), counters and
  latency histograms of the work finished since this process's first scrape, built from the
  rows' finish times, and the machine (free disk in the data dir, GPU memory where there is one).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from plugin.config import Config
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, Instance, Job, JobState, Study, StudyState, utcnow
from plugin.web.system import disk_free, gpus

log = logging.getLogger(__name__)

router = APIRouter()

STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
END_TO_END_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 21600.0)
OVERLAP = timedelta(minutes=10)
"""How far back each scrape looks again for work finished before the last one seen: a row whose
commit came later than its timestamp (another thread or node) is still counted, once."""


class _Histograms:
    """Cumulative histograms by label values, fed one observation at a time."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.help, self.labels, self.buckets = name, help_text, list(labels), tuple(buckets)
        self._counts: dict[tuple[str, ...], list[int]] = {}  # per bucket, not cumulative; last: +Inf
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[labels] = self._sums.get(labels, 0.0) + value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for labels, counts in sorted(self._counts.items()):
            cumulative, total = [], 0
            for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
                total += count
                cumulative.append((floatToGoString(bound), float(total)))
            family.add_metric(list(labels), cumulative, self._sums[labels])
        return family


@dataclass
class _Finished:
    """Which finished rows were observed: each (key, finished time) once, whatever the scrape."""

    floor: datetime  # nothing finished before this is observed (the first scrape)
    mark: datetime  # the latest finished time observed
    seen: dict[tuple[int, datetime], datetime] = field(default_factory=dict)

    def since(self) -> datetime:
        """Where the next query starts."""
        return max(self.floor, self.mark - OVERLAP)

    def first_time(self, key: int, when: datetime) -> bool:
        """True the first time (key, when) is offered."""
        if (key, when) in self.seen:
            return False
        self.seen[(key, when)] = when
        self.mark = max(self.mark, when)
        return True

    def prune(self) -> None:
        oldest = self.since()
        self.seen = {key: when for key, when in self.seen.items() if when >= oldest}


class NodeCollector(Collector):
    """The node's state from the job store and the machine (gauges), and the work finished since
    the first `collect` (counters and latency histograms, each row observed once). Every query is
    bounded by the work in flight or by what finished within `OVERLAP` of the latest finish seen,
    never by the store's history. Thread-safe."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], datetime] = utcnow) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Finished] = {}
        self._completions = 0
        self._jobs_finished: dict[tuple[str, str], int] = {}
        self._sent: dict[str, int] = {}
        self._steps = _Histograms(
            "radgate_job_step_seconds",
            "Seconds of each step (load, infer, encode) of the jobs that finished",
            ("pipeline", "step"),
            STEP_BUCKETS,
        )
        self._end_to_end = _Histograms(
            "radgate_end_to_end_seconds",
            "Seconds from the last instance of a study revision received to its job's last result delivered",
            ("pipeline",),
            END_TO_END_BUCKETS,
        )

    def collect(self) -> Iterator[Any]:
        with self._lock:
            up = 1
            try:
                families = self._from_store()
            except SQLAlchemyError as err:
                log.error("metrics: cannot read the job store: %s", type(err).__name__)
                up, families = 0, []
            yield from families
            yield GaugeMetricFamily("radgate_store_up", "1 if the job store answered this scrape", up)
            yield from self._finished()
        yield from self._machine()

    def _window(self, name: str, now: datetime) -> _Finished:
        window = self._windows.get(name)
        if window is None:
            window = self._windows[name] = _Finished(now, now)
        return window

    def _from_store(self) -> list[Any]:
        """The gauges (work in flight: the states with an index and few rows), and the counters and
        histograms brought up to date."""
        now = self._clock()
        live_jobs = (JobState.WAITING, JobState.QUEUED, JobState.RUNNING, JobState.FAILED)
        live_deliveries = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.DEAD)
        with self._store.session() as s:
            receiving = s.scalar(select(func.count()).where(Study.state == StudyState.RECEIVING))
            jobs = s.execute(
                select(Job.pipeline, Job.state, func.count())
                .where(Job.state.in_(live_jobs))
                .group_by(Job.pipeline, Job.state)
            ).all()
            deliveries = s.execute(
                select(Delivery.destination, Delivery.state, func.count())
                .where(Delivery.state.in_(live_deliveries))
                .group_by(Delivery.destination, Delivery.state)
            ).all()
            self._observe_completions(s, now)
            self._observe_jobs(s, now)
            self._observe_deliveries(s, now)
        families: list[Any] = [
            GaugeMetricFamily(
                "radgate_studies_receiving", "Studies receiving (not complete yet)", receiving or 0
            )
        ]
        family = GaugeMetricFamily(
            "radgate_jobs",
            "Jobs WAITING, QUEUED, RUNNING or FAILED, by pipeline",
            labels=["pipeline", "state"],
        )
        for pipeline, state, n in sorted(jobs, key=lambda row: (row[0] or "", row[1])):
            family.add_metric([pipeline or "", state], n)
        families.append(family)
        queued = sum(n for _pipeline, state, n in jobs if state == JobState.QUEUED)
        families.append(
            GaugeMetricFamily("radgate_queue_depth", "Jobs waiting for a worker (QUEUED)", queued)
        )
        family = GaugeMetricFamily(
            "radgate_deliveries",
            "Deliveries PENDING, SENDING or DEAD, by destination",
            labels=["destination", "state"],
        )
        for destination, state, n in sorted(deliveries):
            family.add_metric([destination, state], n)
        families.append(family)
        return families

    def _finished(self) -> Iterator[Any]:
        """What finished since the first scrape, as observed so far."""
        yield CounterMetricFamily(
            "radgate_study_completions", "Study revisions declared complete", self._completions
        )
        family = CounterMetricFamily(
            "radgate_jobs_finished", "Jobs finished, by pipeline and state", labels=["pipeline", "state"]
        )
        for (pipeline, state), n in sorted(self._jobs_finished.items()):
            family.add_metric([pipeline, state], n)
        yield family
        family = CounterMetricFamily(
            "radgate_deliveries_sent", "Result instances delivered, by destination", labels=["destination"]
        )
        for destination, n in sorted(self._sent.items()):
            family.add_metric([destination], n)
        yield family
        yield self._steps.family()
        yield self._end_to_end.family()

    def _observe_completions(self, s: Any, now: datetime) -> None:
        window = self._window("completions", now)
        rows = s.execute(select(Study.id, Study.completed_at).where(Study.completed_at >= window.since()))
        self._completions += sum(window.first_time(study_id, when) for study_id, when in rows)
        window.prune()

    def _observe_jobs(self, s: Any, now: datetime) -> None:
        window = self._window("jobs", now)
        rows = s.execute(
            select(Job.id, Job.finished_at, Job.pipeline, Job.state, Job.timings).where(
                Job.finished_at >= window.since()
            )
        )
        for job_id, finished_at, pipeline, state, timings in rows:
            if not window.first_time(job_id, finished_at):
                continue
            key = (pipeline or "", state)
            self._jobs_finished[key] = self._jobs_finished.get(key, 0) + 1
            for step, seconds in (timings or {}).items():
                if isinstance(seconds, int | float):
                    self._steps.observe((pipeline or "", step.removesuffix("_s")), float(seconds))
        window.prune()

    def _observe_deliveries(self, s: Any, now: datetime) -> None:
        """Each delivery SENT counts once; a job counts as delivered, for the end-to-end histogram,
        once all its deliveries are SENT, at the last one's time."""
        window = self._window("deliveries", now)
        rows = s.execute(
            select(Delivery.id, Delivery.job_id, Delivery.destination, Delivery.sent_at).where(
                Delivery.sent_at >= window.since()
            )
        )
        touched = set()
        for delivery_id, job_id, destination, sent_at in rows:
            if window.first_time(delivery_id, sent_at):
                self._sent[destination] = self._sent.get(destination, 0) + 1
                touched.add(job_id)
        window.prune()
        if not touched:
            return
        last_instance = (
            select(func.max(Instance.received_at))
            .where(Instance.study_id == Job.study_id, Instance.study_revision == Job.study_revision)
            .correlate(Job)
            .scalar_subquery()
        )
        jobs = s.execute(
            select(
                Job.id,
                Job.pipeline,
                last_instance,
                func.max(Delivery.sent_at),
                func.count(),
                func.sum(case((Delivery.state == DeliveryState.SENT, 1), else_=0)),
            )
            .join(Delivery, Delivery.job_id == Job.id)
            .where(Job.id.in_(sorted(touched)))
            .group_by(Job.id, Job.pipeline, Job.study_id, Job.study_revision)
        )
        for _job_id, pipeline, received, sent, total, n_sent in jobs:
            if n_sent == total and received is not None:
                self._end_to_end.observe((pipeline or "",), max(0.0, (sent - received).total_seconds()))

    def _machine(self) -> Iterator[Any]:
        try:
            disk = disk_free(self._config.data_dir)
        except OSError as err:
            log.warning("metrics: cannot read the data dir's free space: %s", err.strerror)
        else:
            yield GaugeMetricFamily(
                "radgate_disk_free_bytes",
                "Bytes free for the node in the data dir's file system",
                disk.free_bytes,
            )
            yield GaugeMetricFamily(
                "radgate_disk_total_bytes", "Size in bytes of the data dir's file system", disk.total_bytes
            )
        found = gpus()
        if not found:
            return
        used = GaugeMetricFamily("radgate_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
        total = GaugeMetricFamily(
            "radgate_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu", "name"]
        )
        for gpu in found:
            used.add_metric([str(gpu.index), gpu.name], gpu.used_bytes)
            total.add_metric([str(gpu.index), gpu.name], gpu.total_bytes)
        yield used
        yield total


_collectors_lock = threading.Lock()


def _collector(request: Request) -> NodeCollector:
    """The app's collector, made at its first scrape (its histograms count from then on)."""
    state = request.app.state
    with _collectors_lock:
        collector: NodeCollector | None = getattr(state, "metrics_collector", None)
        if collector is None:
            collector = state.metrics_collector = NodeCollector(state.config, state.store)
        return collector


def registry(config: Config, collector: NodeCollector) -> CollectorRegistry:
    """One scrape's registry: ``collector`` and the receiving processes' counters, if any yet."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(collector)
    if config.metrics_dir.is_dir():
        MultiProcessCollector(scrape, path=str(config.metrics_dir))
    return scrape


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """The metrics in Prometheus' text format (no login: see the module docstring)."""
    text = generate_latest(registry(request.app.state.config, _collector(request)))
    return Response(text, media_type=CONTENT_TYPE_LATEST)
