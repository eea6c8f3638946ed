"""Prometheus exporter: a custom collector that reads the shared stats at scrape time.

Nothing is counted twice and nothing is pushed: each scrape sums the stats matrix (a few
microseconds), reads psutil for every engine process, and renders. It runs in the monitor
process (:mod:`engine.monitor`), so a scrape never costs the supervisor anything.
All names and help texts come from :mod:`engine.metrics`.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from . import metrics as M
from .monitor import proc_name, ring_rows
from .stats import HIST_BUCKETS_S, HIST_DOWNLOAD_BASE, HIST_PROCESS_BASE, F, blank, histogram, reason_counts


def _counter(m: M.Metric, labels: tuple[str, ...] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(m.name, m.help, labels=list(labels if labels is not None else m.labels) or None)


def _gauge(m: M.Metric) -> GaugeMetricFamily:
    return GaugeMetricFamily(m.name, m.help, labels=list(m.labels) or None)


class EngineCollector(Collector):
    """Reads ``holder.data`` (an :class:`engine.monitor.LiveData`, None until the run starts).

    Every family has its series from the first scrape, zero until something happens (a
    Prometheus that scrapes at start must not see series appear): before the run hands over
    its stats, a blank matrix of the run's shape (``holder.layout``) stands in for them.
    """

    def __init__(self, holder) -> None:  # noqa: ANN001 - engine.monitor._Holder
        self.holder = holder

    def collect(self) -> Iterator[Metric]:
        info = _gauge(M.BUILD_INFO)
        info.add_metric([__version__], 1)
        yield info
        data = self.holder.data
        if data is not None:
            layout, m = data.layout, data.stats.snapshot()
            view = data.view()
            processes = view.get("processes", ())
            machines = view.get("nodes") or ()
        elif self.holder.layout is not None:
            layout, m = self.holder.layout, blank(self.holder.layout)
            processes = self.holder.procs.sample(m)  # the supervisor and this process exist already
            machines = ()
        else:
            return

        def tot(f: int) -> int:
            return int(m[:, f].sum())

        c = _counter(M.IMAGES)
        c.add_metric(["ok"], tot(F.IMAGES_OK))
        c.add_metric(["failed"], tot(F.IMAGES_FAILED))
        yield c
        expected = int(m[0, F.EXPECTED])
        g = _gauge(M.IMAGES_EXPECTED)
        if expected >= 0:  # -1 while the lists are still being counted: no sample beats a wrong one
            g.add_metric([], expected)
        yield g
        for metric, field in (
            (M.IMAGES_SKIPPED, F.SKIPPED),
            (M.DOWNLOADED_BYTES, F.DOWNLOADED_BYTES),
            (M.WRITTEN_BYTES, F.WRITTEN_BYTES),
            (M.FILES_WRITTEN, F.FILES_WRITTEN),
            (M.RETRIES, F.RETRIES),
            (M.TRANSFERS, F.TRANSFERS_DONE),
            (M.PROCESSED, F.IMAGES_PROCESSED),
        ):
            c = _counter(metric)
            c.add_metric([], tot(field))
            yield c
        for metric, field in ((M.DOWNLOADS_IN_PROGRESS, F.DOWNLOADS_IN_PROGRESS),
                              (M.TRANSFERS_TARGET, F.TRANSFERS_TARGET),
                              (M.RESIZES_IN_PROGRESS, F.RESIZES_IN_PROGRESS)):
            g = _gauge(metric)
            g.add_metric([], tot(field))
            yield g
        c = _counter(M.FAILURES)
        for reason, n in reason_counts(m).items():  # every reason, zeros included: a fixed label set
            c.add_metric([reason], n)
        yield c
        for metric, base in ((M.DOWNLOAD_SECONDS, HIST_DOWNLOAD_BASE), (M.PROCESSING_SECONDS, HIST_PROCESS_BASE)):
            cumulative, sum_s = histogram(m, base)
            bounds = [*(repr(float(b)) for b in HIST_BUCKETS_S), "+Inf"]
            h = HistogramMetricFamily(metric.name, metric.help)
            h.add_metric([], list(zip(bounds, cumulative)), sum_s)
            yield h
        g = _gauge(M.ROWS_WAITING)
        g.add_metric(["fetch"], tot(F.PARKED))
        cells = layout.cells
        g.add_metric(["worker"], int(m[:cells, F.QUEUED_BODIES].sum()))
        g.add_metric(["writer"], int(m[:cells, F.QUEUED_WRITES].sum()))
        yield g
        slots, used = _gauge(M.RING_SLOTS), _gauge(M.RING_USED_SLOTS)
        for r in ring_rows(layout, m):
            slots.add_metric([r["ring"], r["process"]], r["slots"])
            used.add_metric([r["ring"], r["process"]], r["used"])
        yield slots
        yield used
        nodes = _counter(M.NODE_IMAGES)
        # a --ray driver's nodes; on one host, this host
        for n in machines or [{"name": socket.gethostname(), "ok": tot(F.IMAGES_OK), "failed": tot(F.IMAGES_FAILED)}]:
            nodes.add_metric([n["name"], "ok"], n["ok"])
            nodes.add_metric([n["name"], "failed"], n["failed"])
        yield nodes
        cpu, rss = _counter(M.PROCESS_CPU), _gauge(M.PROCESS_RSS)
        for p in processes:
            cpu.add_metric([p["name"]], p["cpu_s"])
            rss.add_metric([p["name"]], p["rss"])
        yield cpu
        yield rss
        hb = _gauge(M.HEARTBEAT_AGE)
        now_ms = time.monotonic() * 1000
        for row in range(layout.rows):
            # A process that has not gone round yet counts from the start: one that never
            # does shows a growing age (an alert fires), not a missing series.
            beat = int(m[row, F.HEARTBEAT_MS]) or self.holder.t0 * 1000
            hb.add_metric([proc_name(layout, row)], max(0.0, (now_ms - beat) / 1000))
        yield hb
        g = _gauge(M.START_TIME)
        g.add_metric([], self.holder.t0_wall)
        yield g


def make_registry(holder) -> CollectorRegistry:  # noqa: ANN001
    # Only our collector: the default process/GC collectors would describe the monitor
    # process, which is not what anyone wants to graph.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(holder))
    return registry


def serve_metrics(holder, host: str, port: int) -> tuple[Callable[[], None], str]:  # noqa: ANN001
    """Serve /metrics on host:port (port 0: any free port); returns (close, URL)."""
    httpd, thread = start_http_server(port, addr=host, registry=make_registry(holder))

    def close() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(2.0)

    shown = f"[{host}]" if ":" in host else host
    return close, f"http://{shown}:{httpd.server_port}/metrics"
