"""Every Prometheus metric the engine exposes: names, types, labels and help, in one place.

Dashboards and alerts depend on these names, so they are defined here once and used by the
exporter (:mod:`engine.exporter`), the Grafana dashboard test and the docs. Naming follows
Prometheus conventions: base units in the name (``_bytes``, ``_seconds``), ``_total`` for
counters. Label values come from fixed sets only (status ok/failed, the error taxonomy
``engine.errors.ALL_REASONS``, process names like ``fetcher-0``), never free text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed (counters end in _total)
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()


IMAGES = Metric("oidl_images_total", "counter", "Rows finished (committed to the state DB), by status.", ("status",))
IMAGES_EXPECTED = Metric("oidl_images_expected", "gauge", "Rows in the run's lists (after --subset/--limit).")
IMAGES_SKIPPED = Metric("oidl_images_skipped_total", "counter", "Rows skipped because an earlier run finished them.")
FAILURES = Metric("oidl_failures_total", "counter", "Rows finished failed, by reason (the error taxonomy).", ("reason",))
DOWNLOADED_BYTES = Metric("oidl_downloaded_bytes_total", "counter", "Body bytes received from the network.")
WRITTEN_BYTES = Metric("oidl_written_bytes_total", "counter", "Bytes written to files under --out.")
FILES_WRITTEN = Metric("oidl_files_written_total", "counter", "Files written under --out (variants and originals).")
DOWNLOADS_IN_PROGRESS = Metric("oidl_downloads_in_progress", "gauge", "Transfers in flight.")
TRANSFERS_TARGET = Metric(
    "oidl_transfers_target",
    "gauge",
    "Transfers the fetchers now aim to keep in flight: found while running from the measured download time and "
    "the workers' rate (engine.autotune), capped by --transfers, --ring-mb and the connection caps.",
)
RESIZES_IN_PROGRESS = Metric("oidl_resizes_in_progress", "gauge", "Images being decoded/resized by workers.")
RETRIES = Metric("oidl_retries_total", "counter", "Transfer attempts re-queued after a transient failure.")
TRANSFERS = Metric("oidl_transfers_total", "counter", "Transfer attempts finished, any outcome.")
PROCESSED = Metric("oidl_images_processed_total", "counter", "Images handled by workers, any outcome.")
DOWNLOAD_SECONDS = Metric("oidl_download_duration_seconds", "histogram", "Duration of one transfer attempt.")
PROCESSING_SECONDS = Metric("oidl_processing_duration_seconds", "histogram", "Worker time per image: decode, "
                            "validate, every variant.")
ROWS_WAITING = Metric(
    "oidl_rows_waiting",
    "gauge",
    "Rows waiting between stages: stage=fetch (queued for a host slot or a retry), worker (bodies waiting for a "
    "worker), writer (rows sent to the writer, not yet committed).",
    ("stage",),
)
RING_SLOTS = Metric("oidl_ring_slots", "gauge", "Shared-memory ring slots owned by a process.", ("ring", "process"))
RING_USED_SLOTS = Metric(
    "oidl_ring_used_slots", "gauge", "Ring slots in use (not on the owner's free list).", ("ring", "process")
)
PROCESS_CPU = Metric("oidl_process_cpu_seconds_total", "counter", "CPU time (user+system) of each engine process.",
                     ("process",))
PROCESS_RSS = Metric("oidl_process_resident_memory_bytes", "gauge", "Resident memory of each engine process.",
                     ("process",))
HEARTBEAT_AGE = Metric(
    "oidl_process_heartbeat_age_seconds", "gauge",
    "Seconds since a process last went round its loop (since the run started, before its first turn).", ("process",)
)
NODE_IMAGES = Metric(
    "oidl_node_images_total",
    "counter",
    "Rows finished per machine, by status: each node of a --ray run as its driver records them (node = IP and "
    "Ray node id), or this host (node = host name) on one machine.",
    ("node", "status"),
)
START_TIME = Metric("oidl_start_time_seconds", "gauge", "Unix time the run started.")
BUILD_INFO = Metric("oidl_build_info", "gauge", "Always 1; the engine version is the label.", ("version",))

ALL: tuple[Metric, ...] = (
    IMAGES,
    IMAGES_EXPECTED,
    IMAGES_SKIPPED,
    FAILURES,
    DOWNLOADED_BYTES,
    WRITTEN_BYTES,
    FILES_WRITTEN,
    DOWNLOADS_IN_PROGRESS,
    TRANSFERS_TARGET,
    RESIZES_IN_PROGRESS,
    RETRIES,
    TRANSFERS,
    PROCESSED,
    DOWNLOAD_SECONDS,
    PROCESSING_SECONDS,
    ROWS_WAITING,
    RING_SLOTS,
    RING_USED_SLOTS,
    NODE_IMAGES,
    PROCESS_CPU,
    PROCESS_RSS,
    HEARTBEAT_AGE,
    START_TIME,
    BUILD_INFO,
)

#: the names the issue requires, with exactly these meanings
REQUIRED: tuple[str, ...] = (
    IMAGES.name,
    IMAGES_EXPECTED.name,
    DOWNLOADED_BYTES.name,
    WRITTEN_BYTES.name,
    DOWNLOADS_IN_PROGRESS.name,
    RESIZES_IN_PROGRESS.name,
)
