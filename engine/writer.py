"""Step 4 of the data flow: the writer process.

It receives finished rows from the supervisor, writes their outputs straight from the slab
(originals from the fetcher's slots, variants from the worker's) through a sink
(:mod:`engine.sinks`: loose files, or webdataset / TFRecord / parquet shards), and records the
rows in the state DB, in batches. Order matters for crash safety:

- ``--format files``: each file is written under ``--out/.oidl-tmp/`` and renamed into place;
  only then is the batch committed, so a row marked ``ok`` always has its files; only after
  the commit are the rows acknowledged (``written``), so the supervisor frees their slots.
- sharded formats: a row's samples are appended to the open shards (``.part`` files) and the
  row is acknowledged as ``released`` (its slots can be reused: the bytes are in the file) but
  not committed. When the shard group is cut, the shards are completed and fsynced, their
  rows committed in one transaction, the shards renamed to their final names, and the rows
  acknowledged as ``written`` (see :mod:`engine.sinks.shards`).

A crash leaves at most files or open shards whose rows are not committed: the next run
redoes those rows. Leftover temporary files are deleted (or, for a shard the DB already
counts, published) at the next start.

Annotations (``--annotations``) are looked up in a thread of this process as soon as rows
arrive, one query per table per message, so the lookup overlaps the batch's wait and writes.
"""

from __future__ import annotations

import select
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from dataclasses import replace
from typing import NamedTuple

from . import state
from .board import Board
from .config import OutputConfig
from .layout import FORMAT_EXT, ORIGINAL
from .proc import pipeline_child
from .ring import Slab
from .sinks import open_sinks
from .sinks.annotations import AnnotationsError, ImageAnnotations
from .sinks.base import Sample, document
from .stats import F, Role, Stats, StatsLayout
from .worker import OutputRef


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
        cfg.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.db = state.connect(cfg.db_path)
        self.columns = {lid: cols for lid, (_, _, cols) in state.lists(self.db).items()}
        self.board = Board.of(stats).writer(index)
        self.sinks = open_sinks(cfg, self.db)
        self.ann = self.sinks.annotations
        # one thread: the annotations DB connection is used from it only
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="oidl-annotations") if self.ann else None
        self.lookups: list[Future] = []
        #: rows in the open shards: written to disk, acknowledged as released, not committed
        self.open_rows: list[tuple[int, state.ImageRow]] = []

    def prefetch(self, records: list[WriteRecord]) -> None:
        """Start looking up the annotations of rows that just arrived."""
        if self.pool is not None:
            ids = [r.row.image_id for r in records if r.row.status == "ok"]
            if ids:
                self.lookups.append(self.pool.submit(self.ann.lookup, ids))

    def _annotations(self) -> dict[str, ImageAnnotations]:
        out: dict[str, ImageAnnotations] = {}
        for fut in self.lookups:
            out.update(fut.result())
        self.lookups = []
        return out

    def _samples(self, rec: WriteRecord, ann: ImageAnnotations | None) -> list[tuple[Sample, OutputRef]]:
        row = rec.row
        refs = ([rec.original] if rec.original is not None else []) + list(rec.outputs)
        need_doc = self.sinks.needs_document
        list_row: dict[str, str] = {}
        rotation = None
        if need_doc:
            list_row = dict(zip(self.columns.get(row.list_id or -1, ()), row.fields or ()))
            try:
                rotation = float(list_row["Rotation"]) if list_row.get("Rotation") else None
            except ValueError:
                rotation = None
        out = []
        for ref in refs:
            fmt = next((k for k, v in FORMAT_EXT.items() if v == ref.ext), ref.ext)
            doc = document(
                row.image_id, variant=ref.variant, width=ref.width, height=ref.height, image_format=fmt,
                source_width=row.width, source_height=row.height, source_format=row.format, rotation=rotation,
                rotation_applied=self.cfg.rotation_applied and ref.variant != ORIGINAL, url=row.url, md5=row.md5,
                list_row=list_row, annotations=ann,
            ) if need_doc else {}
            chunks = list(self.slab.chunks(ref.slots, ref.nbytes))
            out.append((Sample(row.image_id, ref.variant, ref.ext, chunks, ref.nbytes, ref.width, ref.height, doc, ann),
                        ref))
        return out

    def _cut(self, extra: list[state.ImageRow]) -> list[int]:
        """Complete the open shards, commit their rows (and ``extra``) with them, publish them."""
        sealed = self.sinks.shards.seal() if self.sinks.shards else None
        rows = [r for _, r in self.open_rows] + extra
        state.write_batch(self.db, rows, sealed.records if sealed else ())
        if sealed is not None:
            sealed.publish()
        seqs = [s for s, _ in self.open_rows]
        self.open_rows = []
        return seqs

    def flush(self, batch: list[WriteRecord]) -> None:
        anns = self._annotations()
        commit: list[state.ImageRow] = []
        written: list[int] = []
        released: list[int] = []
        shown: list[state.ImageRow] = []
        nbytes = files = 0
        shards = self.sinks.shards
        for rec in batch:
            row = rec.row
            if row.status != "ok":
                commit.append(row)
                written.append(rec.seq)
                shown.append(row)
                continue
            outs = []
            for sample, ref in self._samples(rec, anns.get(row.image_id)):
                outs.append(self.sinks.write(sample))
                self.slab.forget(ref.slots, ref.nbytes)
                nbytes += ref.nbytes
            files += len(outs)
            row = replace(row, outputs=tuple(outs))
            if shards is None:
                commit.append(row)
                written.append(rec.seq)
                shown.append(row)
                continue
            self.open_rows.append((rec.seq, row))
            released.append(rec.seq)
            shown.append(replace(row, outputs=()))  # no single file to show in the gallery
            shards.row_done()
            if shards.full():
                written.extend(self._cut(commit))
                commit = []
        if commit:
            state.write_batch(self.db, commit)
        self.board.finished(shown, time.time())
        self.stats.add(F.WRITTEN_BYTES, nbytes)
        self.stats.add(F.FILES_WRITTEN, files)
        for r in shown:
            if r.status == "ok":
                self.stats.add(F.IMAGES_OK)
            else:
                self.stats.add(F.IMAGES_FAILED)
                if r.reason:
                    self.stats.failed(r.reason)
        done = set(written)
        msgs: list[tuple] = []
        still_open = [s for s in released if s not in done]
        if still_open:
            msgs.append(("released", still_open))
        if written:
            msgs.append(("written", written))
        if msgs:
            self.conn.send(msgs)

    def finish(self) -> None:
        """End of the run: the open shards are complete, committed and published."""
        if self.open_rows:
            self.conn.send([("written", self._cut([]))])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.sinks.close()
        self.db.close()

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
                        self.finish()
                        return
                    if msg[0] == "rec":
                        if not batch:
                            oldest = time.monotonic()
                        batch.extend(msg[1])
                        self.prefetch(msg[1])
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
        writer = None
        try:
            writer = Writer(conn, cfg, slab, stats, index)
            writer.run()
        except (EOFError, BrokenPipeError):
            pass  # the supervisor is gone
        except AnnotationsError as e:
            try:
                conn.send([("fatal", f"annotations: {e}")])
            except OSError:
                pass
        except OSError as e:
            # Disk full, permissions...: the run cannot continue; say why, once, clearly.
            try:
                conn.send([("fatal", f"cannot write output: {e}")])
            except OSError:
                pass
        finally:
            if writer is not None:
                writer.close()


def original_ext(fmt: str | None, url: str) -> str:
    """Extension for a kept original: the real (sniffed) format, else the URL's, else bin."""
    if fmt and fmt in FORMAT_EXT:
        return FORMAT_EXT[fmt]
    suffix = Path(url.split("?", 1)[0]).suffix.lower().lstrip(".")
    return suffix if suffix.isalnum() and 0 < len(suffix) <= 5 else "bin"
