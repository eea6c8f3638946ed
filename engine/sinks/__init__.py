"""Output formats: loose files, webdataset tars, TFRecords, parquet — behind one small interface.

The writer hands every image of every variant to :meth:`Sinks.write` as a
:class:`~engine.sinks.base.Sample` and gets back the state DB's output row (file path, or
shard path and offset). ``files`` writes each sample at once; the sharded formats append it
to the variant's open shard (:class:`~engine.sinks.shards.ShardGroup`), which the writer cuts
(``shards.full()`` -> ``shards.seal()`` -> commit -> ``publish()``).

A new format is a :class:`~engine.sinks.base.ShardWriter` subclass (``add``, ``finish``,
``abort``) and one line in :func:`_shard_writer`.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .. import state
from ..config import OutputConfig
from ..state import OutputRow
from .annotations import AnnotationSource
from .base import FORMATS, SHARD_EXT, Sample, ShardWriter
from .files import FilesSink
from .shards import ShardGroup, recover

LABEL_MAP = "label_map.pbtxt"

__all__ = ["FORMATS", "SHARD_EXT", "Sample", "ShardWriter", "Sinks", "open_sinks", "check_format", "LABEL_MAP"]


class FormatUnavailable(Exception):
    """The format's library is not installed (message says what to install)."""


def check_format(fmt: str) -> None:
    """Raise FormatUnavailable when ``fmt`` needs a library that is missing (checked before a run)."""
    need = {"tfrecord": [("google.protobuf", "protobuf"), ("google_crc32c", "google-crc32c")],
            "parquet": [("pyarrow", "pyarrow")]}.get(fmt, [])
    for module, package in need:
        try:
            __import__(module)
        except ImportError:
            raise FormatUnavailable(
                f"--format {fmt} needs the {package} package: pip install 'oidl-engine[shards]'"
            ) from None


@dataclass
class Sinks:
    files: FilesSink | None
    shards: ShardGroup | None
    annotations: AnnotationSource | None
    #: samples carry the JSON document (always for shards; for files with --annotations only)
    needs_document: bool

    def write(self, s: Sample) -> OutputRow:
        if self.shards is not None:
            return self.shards.write(s)
        assert self.files is not None
        return self.files.write(s)

    def close(self) -> None:
        if self.shards is not None:
            self.shards.abort()  # whatever is still open was not committed: the next run redoes it
        if self.annotations is not None:
            self.annotations.close()


def _label_ids(out_dir: Path, src: AnnotationSource) -> list[tuple[int, str, str]]:
    """Class indices for TFRecord labels: those of an existing label map first (stable on resume),
    then new MIDs after the highest index. 0 stays free (the OD API's background)."""
    from .tfrecord import read_label_map

    items: dict[str, tuple[int, str]] = {}
    for p in sorted(out_dir.glob(f"*/{LABEL_MAP}")):
        for idx, mid, name in read_label_map(p):
            items.setdefault(mid, (idx, name))
    nxt = max((i for i, _ in items.values()), default=0) + 1
    for mid, name in src.label_map():
        if mid not in items:
            items[mid] = (nxt, name)
            nxt += 1
    return sorted((i, m, n) for m, (i, n) in items.items())


def _write_atomic(path: Path, write) -> None:  # noqa: ANN001
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


def _shard_writer(cfg: OutputConfig, path: Path, list_columns: list[str], label_ids: dict[str, int]) -> ShardWriter:
    if cfg.format == "webdataset":
        from .webdataset import TarShard

        return TarShard(path)
    if cfg.format == "tfrecord":
        from .tfrecord import TFRecordShard

        return TFRecordShard(path, label_ids=label_ids)
    if cfg.format == "parquet":
        from .parquet import ParquetShard

        return ParquetShard(path, list_columns=list_columns, annotations=cfg.annotations is not None)
    raise ValueError(f"unknown output format {cfg.format!r}")


def open_sinks(cfg: OutputConfig, db: sqlite3.Connection) -> Sinks:
    """The writer's sinks for this run. Finishes a crashed run's shards first (see shards.recover)."""
    committed = state.shard_paths(db)
    first = recover(cfg.out_dir, committed) if cfg.sharded or committed else 0
    src = AnnotationSource(cfg.annotations, cfg.metadata_dir) if cfg.annotations else None
    if not cfg.sharded:
        files = FilesSink(cfg.out_dir, cfg.tmp_dir, subdirs=cfg.subdirs, durable=cfg.durable, sidecars=src is not None)
        return Sinks(files, None, src, needs_document=src is not None)
    # parquet columns: the union of the run's lists' columns, in order of first appearance
    list_columns: list[str] = []
    for _, (_, _, cols) in sorted(state.lists(db).items()):
        list_columns.extend(c for c in cols if c not in list_columns)
    items = _label_ids(cfg.out_dir, src) if (src is not None and cfg.format == "tfrecord") else []
    label_ids = {mid: i for i, mid, _ in items}
    label_dirs: set[Path] = set()

    def make_writer(variant: str, path: Path) -> ShardWriter:
        if items and path.parent not in label_dirs:
            from .tfrecord import write_label_map

            _write_atomic(path.parent / LABEL_MAP, lambda p: write_label_map(p, items))
            label_dirs.add(path.parent)
        return _shard_writer(cfg, path, list_columns, label_ids)

    group = ShardGroup(cfg.out_dir, cfg.format, shard_rows=cfg.shard_rows, shard_bytes=cfg.shard_bytes,
                       first_number=first, make_writer=make_writer)
    return Sinks(None, group, src, needs_document=True)
