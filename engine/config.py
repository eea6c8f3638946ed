"""Frozen, typed configuration for one run. Built once by the CLI, passed to every process.

Units are in the names (``_s`` seconds, ``_bytes``, ``_bps`` bytes per second).
Component-owned configs live with their component (``RingConfig`` in ``ring``,
``PipelineConfig`` in ``variants``) and are aggregated here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .ring import RingConfig
from .variants import PipelineConfig

#: the default temporary directory under --out
TMP_DIR_NAME = ".oidl-tmp"

USER_AGENT = f"oidl-engine/{__version__} (Open Images downloader; pycurl)"


@dataclass(frozen=True)
class FetchConfig:
    fetchers: int = 1
    #: most transfers in flight per fetcher process; how many are used is found while running
    #: (engine.autotune: as many as keep the workers busy). libcurl handles thousands cheaply.
    transfers: int = 4096
    #: connection caps across the whole run (split evenly over fetchers). The total is a cap, as
    #: large as --transfers: the per-host cap is what keeps the run polite to each host.
    max_connections: int = 4096
    max_host_connections: int = 16
    connect_timeout_s: float = 20.0
    #: a transfer slower than low_speed_bps for low_speed_time_s is aborted (stalled server)
    low_speed_bps: int = 1024
    low_speed_time_s: float = 30.0
    #: total deadline of one attempt
    timeout_s: float = 300.0
    max_redirects: int = 5
    max_retries: int = 15
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    #: per-host pause after a 429/503 when the server gives no Retry-After
    host_backoff_s: float = 10.0
    max_body_bytes: int = 50 * 1024 * 1024
    user_agent: str = USER_AGENT
    verify: bool = True  # check OriginalSize / OriginalMD5 where the list has them
    #: libcurl RESOLVE entries "host:port:address" (pin DNS; tests map names to 127.0.0.1)
    resolve: tuple[str, ...] = ()
    #: accept TLS certificates the system does not trust (never the default)
    insecure: bool = False


@dataclass(frozen=True)
class SourceConfig:
    source: str = "original"  # original | thumbnail | mirror
    mirror_base_url: str = "https://open-images-dataset.s3.amazonaws.com"
    #: directories of originals already on disk (original/ layout, with or without 3-letter
    #: subdirectories); a row whose file is there and verifies is processed without network
    originals_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class OutputConfig:
    out_dir: Path
    db_path: Path
    subdirs: bool = True
    save_originals: bool = False
    #: fsync files before their row is committed (survives power loss; slower)
    durable: bool = False
    #: rows per state-DB transaction and the longest a finished row waits to be committed
    batch_rows: int = 256
    batch_s: float = 0.5
    #: where temporary files go (None: OUT/.oidl-tmp); a run deletes it at start and end, so
    #: several runs writing into one --out at once (the Ray shards) each need their own
    tmp_path: Path | None = None
    #: files | webdataset | tfrecord | parquet (engine.sinks)
    format: str = "files"
    #: a shard group is cut at this many images or when one of its shards reaches shard_bytes
    shard_rows: int = 10_000
    shard_bytes: int | None = 1024**3
    #: annotations database (SQLite path or postgresql:// URL) attached to every sample
    annotations: str | None = None
    #: where the release's mask zips are (segmentations.mask_zip is relative to it); default: the DB's directory
    metadata_dir: Path | None = None
    #: copy of PipelineConfig.apply_rotation: samples say whether Rotation was applied
    rotation_applied: bool = False

    @property
    def sharded(self) -> bool:
        return self.format != "files"

    @property
    def tmp_dir(self) -> Path:
        # Temporary files live in one directory on the same filesystem, so a rename makes
        # them appear atomically and a new run can delete leftovers without walking the tree.
        return self.tmp_path if self.tmp_path is not None else self.out_dir / TMP_DIR_NAME


@dataclass(frozen=True)
class RunConfig:
    lists: tuple[str, ...]
    output: OutputConfig
    fetch: FetchConfig = field(default_factory=FetchConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: routing cells (engine.cells); None: one per WORKERS_PER_CELL workers
    cells: int | None = None
    subset: str | None = None
    limit: int | None = None
    retry_failed: bool = False
    #: give up on shutdown work after this long (SIGINT/SIGTERM)
    shutdown_grace_s: float = 10.0
    #: plain mode: seconds between progress lines
    progress_line_s: float = 5.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    ui: str = "plain"  # plain | tui | web | none
    web_host: str = "127.0.0.1"
    web_port: int | None = None
