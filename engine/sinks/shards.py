"""Shard sets: numbering, cutting, and making a finished shard appear exactly once.

One shard set per variant, ``OUT/<variant>/NNNNN.<ext>``, with ``_NNNNN.json`` (stats and the
index of the shard: ImageID, offset, bytes, size of every sample). The variants of a run are
cut together, so shard ``00007`` of every variant holds the same images: a group is cut
when it has ``shard_rows`` images or any of its shards reaches ``shard_bytes``.

Exactly once, even across SIGKILL:

1. samples are appended to ``NNNNN.<ext>.part``; rows of an open shard are *not* committed;
2. a cut completes every shard of the group (trailer, fsync) and its index
   ``_NNNNN.json.part`` (fsync);
3. one state-DB transaction commits the group's rows, their ``outputs`` (shard path and
   offset) and the ``shards`` rows;
4. only then are the ``.part`` files renamed to their final names (and the directory fsynced).

A crash before 3 leaves ``.part`` files whose shards the DB does not know: the next run
deletes them and redoes their rows into new shards. A crash between 3 and 4 leaves complete,
fsynced ``.part`` files the DB already counts: the next run renames them (roll forward). So a
final name never holds a truncated shard, and an image is in exactly one shard of a variant.
Numbers only go up: a new run starts after the highest number on disk (``.part`` included).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..layout import validate_variant
from ..state import OutputRow
from .base import SHARD_EXT, Sample, ShardWriter, fsync_dir

_NAME = re.compile(r"_?(\d{5,})\.(tar|tfrecord|parquet|json)(\.part)?")
INDEX_EXT = "json"


@dataclass(frozen=True)
class ShardRecord:
    """A row of the state DB's ``shards`` table."""

    path: str  # relative to --out
    variant: str
    format: str
    images: int
    nbytes: int


@dataclass
class Sealed:
    """A cut group: complete under temporary names, to be published after its rows are committed."""

    records: list[ShardRecord]
    renames: list[tuple[Path, Path]]

    def publish(self) -> None:
        dirs = set()
        for part, final in self.renames:
            os.replace(part, final)
            dirs.add(final.parent)
        for d in dirs:
            fsync_dir(d)


def shard_name(number: int, ext: str) -> str:
    return f"{number:05d}.{ext}"


def index_name(shard: str) -> str:
    """``00007.tar`` -> ``_00007.json``: the leading underscore keeps it out of pyarrow's, Spark's
    and datasets' directory reads (``pd.read_parquet("OUT/256/")``) as metadata files are."""
    return f"_{shard.split('.', 1)[0]}.{INDEX_EXT}"


def recover(out_dir: Path, committed: Iterable[str]) -> int:
    """Finish what a crashed run left: publish committed ``.part`` shards, delete the others.

    Returns the first shard number a new group may use (never one on disk).
    """
    done = set(committed)
    highest = -1
    if not out_dir.is_dir():
        return 0
    for d in sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in d.iterdir():
            m = _NAME.fullmatch(f.name)
            if not m:
                continue
            number, part = int(m.group(1)), m.group(3)
            highest = max(highest, number)
            if not part:
                continue
            shard_paths = [f"{d.name}/{shard_name(number, e)}" for e in SHARD_EXT.values()]
            if any(p in done for p in shard_paths):
                os.replace(f, f.with_name(f.name[: -len(".part")]))
            else:
                f.unlink()
    return highest + 1


@dataclass
class _Open:
    writer: ShardWriter
    variant: str
    rel: str  # final path relative to --out
    index: list[list] = field(default_factory=list)


class ShardGroup:
    """The open shards of every variant, cut together."""

    def __init__(
        self,
        out_dir: Path,
        fmt: str,
        *,
        shard_rows: int,
        shard_bytes: int | None,
        first_number: int,
        make_writer: Callable[[str, Path], ShardWriter],
    ) -> None:
        self.out_dir = out_dir
        self.fmt = fmt
        self.ext = SHARD_EXT[fmt]
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.number = first_number
        self.make_writer = make_writer
        self.open: dict[str, _Open] = {}
        self.rows = 0  # images in the open group

    def write(self, s: Sample) -> OutputRow:
        o = self.open.get(s.variant)
        if o is None:
            validate_variant(s.variant)
            d = self.out_dir / s.variant
            d.mkdir(parents=True, exist_ok=True)
            name = shard_name(self.number, self.ext)
            o = _Open(self.make_writer(s.variant, d / f"{name}.part"), s.variant, f"{s.variant}/{name}")
            self.open[s.variant] = o
        offset = o.writer.add(s)
        o.index.append([s.image_id, offset, s.nbytes, s.width, s.height])
        return OutputRow(s.variant, o.rel, s.nbytes, s.width, s.height, offset)

    def row_done(self) -> None:
        """One image (all its variants) is in the group."""
        self.rows += 1

    def full(self) -> bool:
        if self.rows >= self.shard_rows:
            return True
        return self.shard_bytes is not None and any(o.writer.nbytes >= self.shard_bytes for o in self.open.values())

    def seal(self) -> Sealed | None:
        """Complete every open shard and its index under temporary names; the next group gets a new number."""
        if not self.open:
            return None
        records, renames = [], []
        now = time.time()
        for o in self.open.values():
            w = o.writer
            w.finish()
            final = self.out_dir / o.rel
            idx_final = final.with_name(index_name(final.name))
            idx_part = idx_final.with_name(idx_final.name + ".part")
            stats = {
                "shard": final.name,
                "format": self.fmt,
                "variant": o.variant,
                "images": w.samples,
                "bytes": w.nbytes,
                "image_bytes": sum(e[2] for e in o.index),
                "created_at": now,
                # parquet: row number; tar: byte offset of the image member's data; tfrecord: record offset
                "index_columns": ["image_id", "offset", "bytes", "width", "height"],
                "index": o.index,
            }
            with open(idx_part, "w", encoding="utf-8") as f:
                json.dump(stats, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            records.append(ShardRecord(o.rel, o.variant, self.fmt, w.samples, w.nbytes))
            # the shard first, its index last: a reader that sees _NNNNN.json finds NNNNN.<ext>
            renames.append((w.path, final))
            renames.append((idx_part, idx_final))
        self.open = {}
        self.rows = 0
        self.number += 1
        return Sealed(records, renames)

    def abort(self) -> None:
        """Drop the open shards (their rows are not committed; the next run redoes them)."""
        for o in self.open.values():
            try:
                o.writer.abort()
            finally:
                o.writer.path.unlink(missing_ok=True)
        self.open = {}
        self.rows = 0
