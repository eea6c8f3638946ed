"""Step 4 of the data flow: the writer process.

It receives finished rows from the supervisor, writes their files straight from the slab
(originals from the fetcher's slots, variants from the worker's), and records the rows in the
state DB, in batches: many files, then one transaction. Order matters for crash safety:

1. each file is written under ``--out/.oidl-tmp/`` and renamed into place, so no reader ever
   sees a half-written file;
2. only then is the batch committed to the DB, so a row marked ``ok`` always has its files;
3. only after the commit are the rows acknowledged, so the supervisor frees their slots.

A crash between 1 and 2 leaves files whose rows are not finished: the next run redoes them
and the rename replaces the files. Leftover temporary files are deleted at the next start.
"""

from __future__ import annotations

import os
import select
import time
from multiprocessing.connection import Connection
from pathlib import Path
from dataclasses import replace
from typing import NamedTuple

from . import state
from .board import Board
from .config import OutputConfig
from .layout import FORMAT_EXT, ORIGINAL, rel_path
from .proc import pipeline_child
from .ring import Slab
from .stats import F, Role, Stats, StatsLayout
from .worker import OutputRef


#: slices per writev call (Linux's IOV_MAX is 1024)
_IOV_GROUP = 512


class WriteRecord(NamedTuple):
    seq: int
    row: state.ImageRow  # outputs empty here: the writer fills in the paths it wrote
    original: OutputRef | None  # the downloaded body, when --save-originals
    outputs: tuple[OutputRef, ...]


class Writer:
    def __init__(self, conn: Connection, cfg: OutputConfig, slab: Slab, stats: Stats, index: int = 0) -> None:
        self.conn = conn
        self.cfg = cfg
        self.slab = slab
        self.stats = stats
        # plain strings: a Path join per file cost more than the Python around the syscalls
        self.out = str(cfg.out_dir)
        cfg.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_prefix = os.path.join(str(cfg.tmp_dir), f"{os.getpid()}-")
        self.db = state.connect(cfg.db_path)
        self.made_dirs: set[str] = set()
        self.counter = 0
        self.board = Board.of(stats).writer(index)

    def _write_file(self, rel: str, ref: OutputRef) -> int:
        parent = os.path.dirname(rel)
        if parent not in self.made_dirs:
            os.makedirs(os.path.join(self.out, parent), exist_ok=True)
            self.made_dirs.add(parent)
        self.counter += 1
        tmp = f"{self.tmp_prefix}{self.counter}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # one writev per body (an original spans ~5 slots), in groups under IOV_MAX
            views = list(self.slab.chunks(ref.slots, ref.nbytes))
            for i in range(0, len(views), _IOV_GROUP):
                group = views[i : i + _IOV_GROUP]
                done = os.writev(fd, group)
                want = sum(len(v) for v in group)
                if done < want:  # a short write (rare on a regular file): finish it
                    rest = memoryview(b"".join(group))[done:]
                    while rest:
                        rest = rest[os.write(fd, rest):]
            del views
            if self.cfg.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.slab.forget(ref.slots, ref.nbytes)
        os.replace(tmp, os.path.join(self.out, rel))
        return ref.nbytes

    def _apply(self, rec: WriteRecord) -> state.ImageRow:
        row = rec.row
        if row.status != "ok":
            return row
        outs: list[state.OutputRow] = []
        written = 0
        subdirs = self.cfg.subdirs
        if rec.original is not None:
            o = rec.original
            rel = rel_path(ORIGINAL, row.image_id, o.ext, subdirs)
            written += self._write_file(rel, o)
            outs.append(state.OutputRow(ORIGINAL, rel, o.nbytes, row.width, row.height))
        for o in rec.outputs:
            rel = rel_path(o.variant, row.image_id, o.ext, subdirs)
            written += self._write_file(rel, o)
            outs.append(state.OutputRow(o.variant, rel, o.nbytes, o.width, o.height))
        self.stats.add(F.WRITTEN_BYTES, written)
        self.stats.add(F.FILES_WRITTEN, len(outs))
        return replace(row, outputs=tuple(outs))

    def flush(self, batch: list[WriteRecord]) -> None:
        rows = [self._apply(r) for r in batch]
        state.write_batch(self.db, rows)
        self.board.finished(rows, time.time())
        for r in rows:
            if r.status == "ok":
                self.stats.add(F.IMAGES_OK)
            else:
                self.stats.add(F.IMAGES_FAILED)
                if r.reason:
                    self.stats.failed(r.reason)
        self.conn.send([("written", [r.seq for r in batch])])

    def run(self) -> None:
        batch: list[WriteRecord] = []
        oldest = 0.0
        first = True
        cfg = self.cfg
        # Connection.poll() builds a selector per call; one poll object is one syscall.
        poller = select.poll()
        poller.register(self.conn.fileno(), select.POLLIN)
        while True:
            timeout = cfg.batch_s if not batch else max(0.0, oldest + cfg.batch_s - time.monotonic())
            if poller.poll(timeout * 1000):
                for msg in self.conn.recv():
                    if msg[0] == "stop":
                        if batch:
                            self.flush(batch)
                        return
                    if msg[0] == "rec":
                        if not batch:
                            oldest = time.monotonic()
                        batch.extend(msg[1])
            # one transaction per batch_rows rows or per batch_s seconds, whichever comes first;
            # the run's first rows at once, so the first image shows up without a batch's wait
            if batch and (first or len(batch) >= cfg.batch_rows or time.monotonic() - oldest >= cfg.batch_s):
                self.flush(batch)
                batch = []
                first = False
            self.stats.set(F.HEARTBEAT_MS, int(time.monotonic() * 1000))


def writer_main(
    conn: Connection, cfg: OutputConfig, slab_name: str, slot_bytes: int, layout: StatsLayout, index: int = 0
) -> None:
    name = "writer" if layout.cells == 1 else f"writer-{index}"
    with pipeline_child(name, slab_name, slot_bytes, layout, Role.WRITER, index) as (slab, stats):
        try:
            Writer(conn, cfg, slab, stats, index).run()
        except (EOFError, BrokenPipeError):
            pass  # the supervisor is gone
        except OSError as e:
            # Disk full, permissions...: the run cannot continue; say why, once, clearly.
            try:
                conn.send([("fatal", f"cannot write output: {e}")])
            except OSError:
                pass


def original_ext(fmt: str | None, url: str) -> str:
    """Extension for a kept original: the real (sniffed) format, else the URL's, else bin."""
    if fmt and fmt in FORMAT_EXT:
        return FORMAT_EXT[fmt]
    suffix = Path(url.split("?", 1)[0]).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() and 0 < len(suffix) <= 5 else "bin"
