"""Step 1 and the glue of the data flow: the supervisor (the main process, or one routing
cell of a run split into several: see :mod:`engine.cells`).

It streams the lists (a cell keeps the rows whose ImageID hashes to it), skips rows the
state DB says are finished, hands rows to fetchers,
routes bodies to workers and finished rows to the writer, and gives slots back to their
owners once the writer has committed. Every message passes through here, which is what
makes crashes recoverable: the supervisor always knows which row and which slots each child
holds, so

- a fetcher that dies: its rows are fetched again by its replacement;
- a worker that dies: its bodies are still in the slab and go to another worker (an image
  that kills two workers fails as ``worker_crash``);
- the writer that dies: its unacknowledged rows are sent again to its replacement;
- the supervisor that dies (even SIGKILL): the kernel kills the children (PDEATHSIG), the
  resource tracker unlinks the segments, and the next run redoes the unfinished rows (a
  cell that dies is started again by its parent, which redoes them at once).

Messages are small tuples of ints and strings; image bytes never go through a pipe.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import sys
import queue
import select
import selectors
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Callable, Iterator

from . import inputs, state
from .config import RunConfig
from .errors import Reason
from .fetcher import FetchInfo, FetchJob, fetcher_main
from .inputs import BadRow, Row
from .layout import ORIGINAL
from .ring import ShmTooSmall, Slab, SlotRange, fit_to_shm, remove_stale_segments, shm_available_bytes
from .stats import F, Role, Stats, StatsLayout
from .worker import Decoded, OutputRef, worker_main
from .writer import WriteRecord, original_ext, writer_main

log = logging.getLogger("oidl")

#: bodies a worker may hold at once: one being decoded, one ready to start
_WORKER_DEPTH = 2
#: rows read from the lists per DB lookup of finished rows
_FEED_BATCH = 512
#: rows read ahead of the fetchers: this many times what they hold (in flight and queued),
#: at most this many (see _read_ahead)
_AHEAD_PER_HELD = 4
_AHEAD_MAX = 16384
#: extensions an original may have been saved under (the sniffed format's)
_ORIGINAL_EXTS = ("jpg", "png", "gif", "webp", "jpeg", "bin")
#: a child restarted more often than this is broken, not unlucky
_MAX_RESTARTS = 20
#: largest message list written from the routing loop itself (see _Child.post)
_DIRECT_SEND_BYTES = 32 * 1024


class RunError(Exception):
    """A run that cannot go on (unwritable output, a child that keeps dying)."""


@dataclass(frozen=True)
class CellSpec:
    """What a supervisor running as one routing cell of a bigger run needs (engine.cells).

    The cell takes the rows whose ImageID hashes to ``index`` (see :func:`cell_of`), reports
    into rows of a stats segment the parent owns, and numbers its fetchers and workers from
    ``fetcher_base`` / ``worker_base`` in that segment. Row sequence numbers are unique across
    cells (``index + 1``, then every ``count``) so the board can name any cell's images.
    """

    index: int
    count: int
    layout: StatsLayout
    fetcher_base: int
    worker_base: int
    list_ids: tuple[int, ...]
    #: a replacement for a cell that died: rows its predecessors committed are counted already
    restarted: bool = False


def cell_of(key: str, cells: int) -> int:
    """The routing cell of a row: a stable hash of its ImageID (the same in every run)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % cells if cells > 1 else 0


@dataclass
class _Row:
    """A row in flight, from dispatch to the writer's acknowledgement."""

    seq: int
    row: Row | BadRow
    list_id: int
    url: str | None = None
    fetcher: int = -1
    worker: int = -1
    body: tuple[tuple[int, ...], int] | None = None
    info: FetchInfo | None = None
    decoded: Decoded | None = None
    record: WriteRecord | None = None
    crashes: int = 0
    #: the list's OriginalMD5 (hex) the worker checks the body against; the body's own MD5,
    #: computed by the worker where the bytes are hot anyway (workers multiply with --procs)
    md5_expected: str | None = None
    md5: str | None = None
    #: in an open shard: its slots are free again, its row not committed yet (sharded formats)
    released: bool = False


@dataclass
class _Child:
    proc: mp.process.BaseProcess
    conn: Connection
    restarts: int = 0
    outstanding: int = 0  # worker: bodies sent, not done
    holds: set[int] = field(default_factory=set)  # seqs held by this child
    # The routing loop must never block on a child: a fetcher blocked sending to us while we
    # block sending to it (both pipe directions full) is a deadlock. So a message list that
    # might block goes through an outbox drained by a thread of its own, and the loop keeps
    # reading. Waking that thread for every list cost more than the routing itself, so a
    # small list is written directly when the socket has room and nothing is queued before it.
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    queued: int = 0  # lists in the outbox or being written by the sender thread
    queued_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[tuple] = field(default_factory=list)  # this loop turn's messages, see _send
    sender: threading.Thread | None = None

    # Connection.poll() builds a selector per call; one poll object per child is one syscall.
    poller: select.poll = field(default_factory=select.poll)
    wpoller: select.poll = field(default_factory=select.poll)

    def start_sender(self) -> "_Child":
        self.poller.register(self.conn.fileno(), select.POLLIN)
        self.wpoller.register(self.conn.fileno(), select.POLLOUT)
        self.sender = threading.Thread(target=_drain_outbox, args=(self,), daemon=True)
        self.sender.start()
        return self

    def readable(self) -> bool:
        return bool(self.poller.poll(0))

    def post(self, msgs: list[tuple]) -> None:
        data = ForkingPickler.dumps(msgs)
        # A Unix socket polls writable only while under a quarter of its send buffer (~200 KiB)
        # is in use, so a write this small cannot block; queued == 0 keeps the order.
        if not self.queued and len(data) <= _DIRECT_SEND_BYTES and self.wpoller.poll(0):
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                pass  # the child is gone; its sentinel tells the loop
            return
        with self.queued_lock:
            self.queued += 1
        self.outbox.put(data)

    def close_outbox(self) -> None:
        self.outbox.put(None)


def _drain_outbox(child: _Child) -> None:
    while (data := child.outbox.get()) is not None:
        try:
            child.conn.send_bytes(data)
        except (OSError, ValueError):
            return  # the child is gone; its sentinel tells the loop
        with child.queued_lock:
            child.queued -= 1


@dataclass
class RunSummary:
    ok: int
    failed: int
    skipped: int
    reasons: dict[str, int]
    elapsed_s: float
    interrupted: bool
    #: lists that broke part-way (one line each: file, line, reason): the run is incomplete
    broken_lists: tuple[str, ...] = ()


def prepare_run(cfg: RunConfig) -> tuple[sqlite3.Connection, list[int]]:
    """Output directories, leftovers of a run that died removed, state DB, lists registered.

    Raises inputs.ListError for a list that cannot be read (a usage error).
    """
    out = cfg.output
    out.out_dir.mkdir(parents=True, exist_ok=True)
    out.db_path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a run that died: temporary files and shared segments.
    shutil.rmtree(out.tmp_dir, ignore_errors=True)
    out.tmp_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_segments()
    if removed:
        log.info("removed %d stale shared-memory segments", len(removed))
    state.init(out.db_path)
    db = state.connect(out.db_path)
    state.record_run_option(db, "apply_rotation", "1" if cfg.pipeline.apply_rotation else "0")
    list_ids = []
    for path in cfg.lists:
        info = inputs.list_info(path)
        list_ids.append(state.register_list(db, os.path.abspath(path), info.kind.value, info.columns))
    return db, list_ids


class Supervisor:
    def __init__(
        self, cfg: RunConfig, on_tick: Callable[["Supervisor"], None] | None = None, cell: CellSpec | None = None
    ) -> None:
        self.cfg = cfg
        self.on_tick = on_tick
        self.cell = cell
        self.ctx = mp.get_context("spawn")  # never fork a process that runs libcurl/libvips threads
        self.rows: dict[int, _Row] = {}
        self.by_id: dict[str, int] = {}
        # sequence numbers unique across cells: cell k uses k+1, k+1+n, k+1+2n...
        self.seq_step = cell.count if cell else 1
        self.seq = (cell.index + 1 - cell.count) if cell else 0
        self.skip_absorb = 0  # see _skip
        self.bodies: deque[int] = deque()  # seqs with a body waiting for a worker
        self.to_writer: list[WriteRecord] = []
        self.fetchers: list[_Child] = []
        self.workers: list[_Child] = []
        self.writer: _Child | None = None
        self.feed: Iterator[tuple[Row | BadRow, int]] | None = None
        self.feed_done = False
        self.refeed: deque[int] = deque()  # seqs to fetch again (their fetcher died)
        # rows read from the lists, not handed out yet (see _read_ahead): in list order, as
        # (index in the lists, job); the larger ones also as (index of their early turn, seq,
        # job); seqs handed out early, still to be dropped from self.ahead
        self.ahead: deque[tuple[int, FetchJob]] = deque()
        self.early: list[tuple[float, int, FetchJob]] = []
        self.handed: set[int] = set()
        self.read = 0  # rows of the lists read so far
        self.sizes = (0, 0)  # known OriginalSizes read so far: (count, total bytes)
        self.stop_signals = 0
        self.stop_signal = 0
        self.fatal: str | None = None
        self.skipped = 0
        self.in_shards = 0  # rows released into open shards, not committed yet
        self.ok = 0
        self.failed = 0
        self.reasons: dict[str, int] = {}
        self.broken_lists: list[str] = []

    # -- set-up -------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg = self.cfg
        out = cfg.output
        if self.cell is not None:  # the parent prepared the output, the DB and the lists
            self.db = state.connect(out.db_path)
            self.list_ids = list(self.cell.list_ids)
            return
        self.db, self.list_ids = prepare_run(cfg)

    def _start_children(self) -> None:
        cfg = self.cfg
        nf = max(1, cfg.fetch.fetchers)
        nw = max(1, cfg.workers)
        rc = cfg.ring
        shm = shm_available_bytes()
        if shm is not None:  # every cell starts at once: each may count on its share
            try:
                rc = fit_to_shm(rc, nf, nw, shm // (self.cell.count if self.cell else 1), 2 * cfg.fetch.max_body_bytes)
            except ShmTooSmall as e:
                raise RunError(str(e)) from None
            if rc != cfg.ring:
                log.warning("/dev/shm has %d MiB free: the fetchers' rings are capped at %d MiB each",
                            shm >> 20, rc.fetch_slots * rc.slot_bytes >> 20)
        total = nf * rc.fetch_slots + nw * rc.worker_slots
        self.slab = Slab.create(total, rc.slot_bytes)
        self.fetch_ranges = [SlotRange(i * rc.fetch_slots, (i + 1) * rc.fetch_slots) for i in range(nf)]
        base = nf * rc.fetch_slots
        self.worker_ranges = [SlotRange(base + j * rc.worker_slots, base + (j + 1) * rc.worker_slots) for j in range(nw)]
        cell = self.cell
        if cell is None:
            self.stats = Stats.create(nf, nw)
            self.fetcher_base = self.worker_base = self.cell_index = 0
        else:
            self.stats = Stats.attach(cell.layout, Role.SUPERVISOR, cell.index)
            self.fetcher_base, self.worker_base, self.cell_index = cell.fetcher_base, cell.worker_base, cell.index
            if cell.restarted:
                # The lists are read again from the top: rows committed by this cell's earlier
                # instances (and rows they skipped) are skipped again without being counted twice.
                m = self.stats.m
                lay = cell.layout
                self.skip_absorb = int(m[lay.row(Role.SUPERVISOR, cell.index), F.SKIPPED]) + sum(
                    int(m[lay.row(Role.WRITER, cell.index), f]) for f in (F.IMAGES_OK, F.IMAGES_FAILED)
                )
        self.layout = self.stats.layout
        self.writer = self._spawn_writer()
        self.fetchers = [self._spawn_fetcher(i) for i in range(nf)]
        self.workers = [self._spawn_worker(j) for j in range(nw)]
        self.sel = selectors.EpollSelector()
        self._watch(self.writer, "writer", 0)
        for i, f in enumerate(self.fetchers):
            self._watch(f, "fetcher", i)
        for j, w in enumerate(self.workers):
            self._watch(w, "worker", j)

    def _spawn(self, name: str, target: Callable, lead: tuple, *rest: object) -> _Child:
        """Start ``target(*lead, conn, *rest)`` in a new process talking to us over ``conn``."""
        parent, child = self.ctx.Pipe(duplex=True)
        p = self.ctx.Process(target=target, args=(*lead, child, *rest), name=name, daemon=True)
        p.start()
        child.close()
        return _Child(p, parent).start_sender()

    def _free_in_range(self, rng: SlotRange) -> list[int]:
        """Slots of ``rng`` not held by any row downstream: what a (re)started child owns."""
        used: set[int] = set()
        for r in self.rows.values():
            if r.body:
                used.update(s for s in r.body[0] if s in rng)
            if r.decoded:
                for o in r.decoded.outputs:
                    used.update(s for s in o.slots if s in rng)
        return [s for s in reversed(rng.indices()) if s not in used]

    def _spawn_fetcher(self, i: int) -> _Child:
        rng = self.fetch_ranges[i]
        g = self.fetcher_base + i  # its number in the run: stats row, board section, process name
        return self._spawn(
            f"oidl-fetcher-{g}", fetcher_main, (g,), self.cfg.fetch, self.slab.name, self.slab.slot_bytes, rng,
            self._free_in_range(rng), self.layout,
        )

    def _spawn_worker(self, j: int) -> _Child:
        rng = self.worker_ranges[j]
        g = self.worker_base + j
        return self._spawn(
            f"oidl-worker-{g}", worker_main, (g,), self.cfg.pipeline, self.slab.name, self.slab.slot_bytes, rng,
            self._free_in_range(rng), self.layout,
        )

    def _spawn_writer(self) -> _Child:
        k = self.cell_index
        return self._spawn(
            "oidl-writer" if self.cell is None else f"oidl-writer-{k}", writer_main, (), self.cfg.output,
            self.slab.name, self.slab.slot_bytes, self.layout, k,
        )

    # -- feeding ------------------------------------------------------------------------
    def _iter_feed(self) -> Iterator[tuple[Row | BadRow, int]]:
        """Rows still to do, in list order, skipping rows the DB says are finished."""
        cfg = self.cfg
        it = inputs.iter_rows(list(cfg.lists), subset=cfg.subset, limit=cfg.limit, on_broken=self._list_broken)
        cells = self.cell.count if self.cell else 1
        mine = self.cell_index
        while True:
            batch = []
            for item in it:
                # --limit counts rows of the lists (every cell reads them all), then each cell
                # keeps its own: the partition is by ImageID, so duplicates meet in one cell
                if cells > 1 and cell_of(self._key(item), cells) != mine:
                    continue
                batch.append(item)
                if len(batch) >= _FEED_BATCH:
                    break
            if not batch:
                return
            keys = [self._key(x) for x in batch]
            done = state.finished_ids(self.db, keys, include_failed=not cfg.retry_failed)
            for item, key in zip(batch, keys):
                if key in done:
                    self._skip()
                    continue
                yield item, self.list_ids[item.list_index]

    def _skip(self) -> None:
        self.skipped += 1
        if self.skip_absorb > 0:  # counted already by an earlier instance of this cell
            self.skip_absorb -= 1
            return
        self.stats.add(F.SKIPPED)

    def _list_broken(self, e: inputs.ListBroken) -> None:
        """A list that breaks part-way: its rows so far are done, the next list is read."""
        state.record_broken_list(self.db, self.list_ids[e.list_index], e, self.broken_lists)

    @staticmethod
    def _key(item: Row | BadRow) -> str:
        if isinstance(item, BadRow):
            # A row whose ImageID itself is unusable gets a key that is never a path.
            return item.image_id or f"bad-row:{item.list_index}:{item.line}"
        return item.image_id

    def _resolve(self, row: Row) -> tuple[str | None, int | None, str | None]:
        """(url, expected size, expected md5 hex) for the configured source."""
        src = self.cfg.source
        if src.source == "mirror":
            split = row.subset or self.cfg.subset  # bare ImageID lists name no split
            if not split:
                return None, None, None
            return f"{src.mirror_base_url.rstrip('/')}/{split}/{row.image_id}.jpg", None, None
        if src.source == "thumbnail" and row.thumbnail_url:
            return row.thumbnail_url, None, None  # regenerated on the fly: no checksum applies
        md5 = inputs.md5_b64_to_hex(row.original_md5) if row.original_md5 else None
        return row.original_url, row.original_size, md5

    def _next_jobs(self, n: int, fetcher: int) -> list[FetchJob]:
        jobs: list[FetchJob] = []
        while len(jobs) < n and self.refeed:
            r = self.rows[self.refeed.popleft()]
            jobs.append(self._job(r))
        self._read_ahead(n)
        ahead, early = self.ahead, self.early
        while len(jobs) < n:
            while ahead and ahead[0][1].seq in self.handed:  # handed out early already
                self.handed.discard(ahead.popleft()[1].seq)
            if early and (not ahead or early[0][0] <= ahead[0][0]):  # a large body's early turn
                job = heapq.heappop(early)[2]
                self.handed.add(job.seq)
            elif ahead:
                job = ahead.popleft()[1]
            else:
                break
            jobs.append(job)
        for job in jobs:
            self.rows[job.seq].fetcher = fetcher
            self.fetchers[fetcher].holds.add(job.seq)
        return jobs

    def _read_ahead(self, n: int) -> None:
        """Read rows ahead of the fetchers, so that large bodies can start before their turn.

        The run ends when its slowest transfer does: a 2 MB body from a host that gives a
        connection 100 KB/s takes 20 s, and one handed out among the list's last rows holds
        the whole run up for that long after every other row is done. So a row larger than
        the mean (the lists' OriginalSize) is handed out as many rows before its turn as are
        taken while its extra bytes download: by Little's law, what the fetchers hold (in
        flight and queued) times its size over the mean, less one. It then ends about when
        its turn would have come, and in steady state as many large bodies are in flight as
        in list order (the ring's memory is the same). The window grows by at most n/2 rows
        per request of n, so when it grows, at most one and a half times the usual share of
        large rows fall due at once. Order does not matter for correctness: rows are finished by ImageID.
        """
        if self.feed_done or self.stop_signals:
            return
        held = sum(len(f.holds) for f in self.fetchers)
        window = min(_AHEAD_MAX, max(2 * n, _AHEAD_PER_HELD * held))
        budget = n + n // 2
        while len(self.ahead) < window and budget > 0 and not self.feed_done:
            i = self.read
            job = self._read_one()
            if job is None:
                continue
            budget -= 1
            self.ahead.append((i, job))
            size = job.expected_size
            if not size:
                continue
            k, total = self.sizes = (self.sizes[0] + 1, self.sizes[1] + size)
            lead = min(window, held / 2 * (size * k / total - 1))  # held: in flight and as many queued
            if lead >= 1:
                heapq.heappush(self.early, (i - lead, job.seq, job))

    def _read_one(self) -> FetchJob | None:
        """The next row of the lists, to fetch; None for a row finished at once, or the end."""
        assert self.feed is not None
        got = inputs.next_or_none(self.feed, self.broken_lists)
        if got is None:
            self.feed_done = True
            return None
        item, list_id = got
        self.read += 1
        key = self._key(item)
        if key in self.by_id:  # the same ImageID twice in the run's lists
            self._skip()
            return None
        self.seq += self.seq_step
        r = _Row(self.seq, item, list_id)
        self.rows[r.seq] = r
        self.by_id[key] = r.seq
        if isinstance(item, BadRow):
            log.warning("%s:%d: %s", item.path, item.line, item.error)
            self._finish_failed(r, item.reason, f"{item.path}:{item.line}: {item.error}")
            return None
        url, size, md5 = self._resolve(item)
        if not url:
            self._finish_failed(r, Reason.BAD_URL, f"no URL for source {self.cfg.source.source!r}")
            return None
        if not url.lower().startswith(("http://", "https://")):
            self._finish_failed(r, Reason.BAD_URL, f"only http and https are fetched: {url[:200]}")
            return None
        r.url = url
        r.md5_expected = md5 if self.cfg.fetch.verify else None
        return FetchJob(r.seq, url, size, md5, self._local_original(item.image_id))

    def _job(self, r: _Row) -> FetchJob:
        assert isinstance(r.row, Row) and r.url
        _, size, md5 = self._resolve(r.row)
        return FetchJob(r.seq, r.url, size, md5, self._local_original(r.row.image_id))

    def _local_original(self, image_id: str) -> str | None:
        """An original of this row already on disk, in original/ layout (the fetcher verifies it)."""
        for d in self.cfg.source.originals_dirs:
            for sub in (image_id[:3], ""):
                for ext in _ORIGINAL_EXTS:
                    p = os.path.join(d, sub, f"{image_id}.{ext}")
                    if os.path.isfile(p):
                        return p
        return None

    # -- finishing rows -----------------------------------------------------------------
    def _record(self, r: _Row, status: str, reason: Reason | None, detail: str | None) -> state.ImageRow:
        item = r.row
        info = r.info
        d = r.decoded
        return state.ImageRow(
            image_id=self._key(item),
            status=status,
            reason=reason.value if reason else None,
            detail=detail,
            url=info.url if info else r.url,
            nbytes=r.body[1] if r.body else None,
            md5=r.md5 or (info.md5_hex if info and info.md5_hex else None),  # a body's: the worker's
            width=d.width if d else None,
            height=d.height if d else None,
            format=d.format if d else None,
            attempts=info.attempts if info else 0,
            list_id=r.list_id,
            line=item.line,
            fields=item.fields,
        )

    def _finish_failed(self, r: _Row, reason: Reason, detail: str) -> None:
        self._release_body(r)
        rec = WriteRecord(r.seq, self._record(r, "failed", reason, detail), None, ())
        r.record = rec
        self.to_writer.append(rec)

    def _finish_ok(self, r: _Row) -> None:
        d = r.decoded
        assert d is not None and r.body is not None and r.info is not None
        original = None
        if self.cfg.output.save_originals:
            slots, n = r.body
            original = OutputRef(ORIGINAL, original_ext(d.format, r.info.url), slots, n, d.width, d.height)
        else:
            self._release_body(r)
        rec = WriteRecord(r.seq, self._record(r, "ok", None, None), original, d.outputs)
        r.record = rec
        self.to_writer.append(rec)

    def _release_body(self, r: _Row) -> None:
        """Give the body's slots back to the fetcher that owns them."""
        if not r.body:
            return
        slots = r.body[0]
        self._return_slots(slots, self.fetch_ranges, self.fetchers)
        r.body = (), r.body[1]

    def _return_slots(self, slots: tuple[int, ...], ranges: list[SlotRange], children: list[_Child]) -> None:
        if not slots:
            return
        size = len(ranges[0])
        base = ranges[0].start
        by_owner: dict[int, list[int]] = {}
        for s in slots:
            by_owner.setdefault((s - base) // size, []).append(s)
        for owner, ss in by_owner.items():
            self._send(children[owner], ("slots", ss))

    def _released(self, seqs: list[int]) -> None:
        """The writer has the rows' bytes in an open shard: free their slots, keep the rows
        (in by_id, so a duplicate ImageID still waits) until the shard is committed."""
        for seq in seqs:
            r = self.rows.get(seq)
            if r is None or r.released:
                continue
            self._release_body(r)
            if r.decoded and r.decoded.outputs:
                slots = tuple(s for o in r.decoded.outputs for s in o.slots)
                self._return_slots(slots, self.worker_ranges, self.workers)
            r.decoded = None
            r.released = True
            self.in_shards += 1

    def _written(self, seqs: list[int]) -> None:
        for seq in seqs:
            r = self.rows.pop(seq, None)
            if r is None:
                continue
            self.by_id.pop(self._key(r.row), None)
            if r.released:
                self.in_shards -= 1
            self._release_body(r)
            if r.decoded and r.decoded.outputs:
                slots = tuple(s for o in r.decoded.outputs for s in o.slots)
                self._return_slots(slots, self.worker_ranges, self.workers)
            rec = r.record
            assert rec is not None
            if rec.row.status == "ok":
                self.ok += 1
            else:
                self.failed += 1
                reason = rec.row.reason or ""
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.writer:
            self.writer.holds.difference_update(seqs)

    # -- message handling ---------------------------------------------------------------
    def _watch(self, child: _Child, kind: str, idx: int) -> None:
        """Listen to a child's messages and to its death, in the loop's one epoll."""
        self.sel.register(child.conn.fileno(), selectors.EVENT_READ, (kind, idx, child))
        self.sel.register(child.proc.sentinel, selectors.EVENT_READ, (kind + "-dead", idx, child))

    def _unwatch(self, child: _Child) -> None:
        for fd in (child.conn.fileno(), child.proc.sentinel):
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def _send(self, child: _Child, msg: tuple) -> None:
        # Collected per loop turn and sent as one list (_post_all): one pickle, one write and
        # one wake-up of the child per turn instead of one per message. Never blocks (see
        # _Child.outbox). A dead child's messages are dropped with it; its replacement is
        # given the state it needs.
        child.pending.append(msg)

    def _post_all(self) -> None:
        for c in (*self.fetchers, *self.workers, self.writer):
            if c is not None and c.pending:
                c.post(c.pending)
                c.pending = []

    def _on_fetcher(self, i: int, msg: tuple) -> None:
        kind = msg[0]
        child = self.fetchers[i]
        if kind == "want":
            jobs = self._next_jobs(msg[1], i)
            if jobs:
                self._send(child, ("jobs", jobs))
            return
        seq = msg[1]
        child.holds.discard(seq)
        r = self.rows.get(seq)
        if r is None:
            return
        r.fetcher = -1
        if kind == "body":
            _, _, slots, nbytes, info = msg
            r.body = (slots, nbytes)
            r.info = info
            self.bodies.append(seq)
        elif kind == "fail":
            _, _, reason, detail, info = msg
            r.info = info
            self._finish_failed(r, Reason(reason), detail)

    def _on_worker(self, j: int, msg: tuple) -> None:
        child = self.workers[j]
        _, seq, out, md5 = msg
        child.outstanding -= 1
        child.holds.discard(seq)
        r = self.rows.get(seq)
        if r is None:
            return
        r.worker = -1
        r.md5 = md5
        if out[0] == "ok":
            r.decoded = out[1]
            self._finish_ok(r)
        else:
            self._finish_failed(r, Reason(out[1]), out[2])

    def _dispatch_bodies(self) -> None:
        while self.bodies:
            j = min(range(len(self.workers)), key=lambda k: self.workers[k].outstanding)
            w = self.workers[j]
            if w.outstanding >= _WORKER_DEPTH:
                return
            seq = self.bodies.popleft()
            r = self.rows[seq]
            assert r.body is not None and isinstance(r.row, Row)
            rot = r.row.rotation
            self._send(w, ("job", seq, r.body[0], r.body[1], rot, r.md5_expected))
            w.outstanding += 1
            w.holds.add(seq)
            r.worker = j

    def _flush_writer(self) -> None:
        if self.to_writer and self.writer:
            self.writer.holds.update(rec.seq for rec in self.to_writer)
            self._send(self.writer, ("rec", self.to_writer))
            self.to_writer = []

    # -- crashes ------------------------------------------------------------------------
    def _restart(self, child: _Child, what: str) -> None:
        child.restarts += 1
        if child.restarts > _MAX_RESTARTS:
            raise RunError(f"{what} keeps dying (exit code {child.proc.exitcode}); giving up")
        log.warning("%s died (exit code %s); restarting it", what, child.proc.exitcode)
        self._unwatch(child)
        child.close_outbox()
        child.conn.close()

    def _on_death(self, kind: str, idx: int) -> None:
        if kind == "fetcher":
            old = self.fetchers[idx]
            self._restart(old, f"fetcher {idx}")
            for seq in sorted(old.holds):
                r = self.rows.get(seq)
                if r is not None:
                    self.refeed.append(seq)
            new = self._spawn_fetcher(idx)
            new.restarts = old.restarts
            self.fetchers[idx] = new
            self._watch(new, "fetcher", idx)
        elif kind == "worker":
            old = self.workers[idx]
            self._restart(old, f"worker {idx}")
            new_bodies = []
            for seq in sorted(old.holds):
                r = self.rows.get(seq)
                if r is None:
                    continue
                r.crashes += 1
                if r.crashes >= 2:
                    self._finish_failed(r, Reason.WORKER_CRASH, "the image killed a worker process twice")
                else:
                    new_bodies.append(seq)
            self.bodies.extendleft(reversed(new_bodies))
            new = self._spawn_worker(idx)
            new.restarts = old.restarts
            self.workers[idx] = new
            self._watch(new, "worker", idx)
        else:
            assert self.writer is not None
            old = self.writer
            self._restart(old, "writer")
            self.writer = self._spawn_writer()
            self.writer.restarts = old.restarts
            self._watch(self.writer, "writer", 0)
            resend = []
            for seq in sorted(old.holds):
                r = self.rows.get(seq)
                if r is None:
                    continue
                if r.released:
                    # its bytes died with the writer's open shard: fetch it again
                    r.released = False
                    self.in_shards -= 1
                    r.body = r.info = r.record = None
                    self.refeed.append(seq)
                elif r.record is not None:
                    resend.append(r.record)
            self.to_writer = resend + self.to_writer

    # -- main loop ----------------------------------------------------------------------
    def _handle_signal(self, signum: int, frame: object) -> None:
        self.stop_signals += 1
        self.stop_signal = signum
        if self.stop_signals == 1:
            print(
                f"\n{signal.Signals(signum).name}: finishing the images in hand (again to stop at once)...",
                file=sys.stderr,
                flush=True,
            )

    def _outstanding(self) -> bool:
        # rows in open shards are the writer's: it commits them when it is told to stop
        return len(self.rows) > self.in_shards or bool(self.to_writer)

    def run(self) -> RunSummary:
        t0 = time.monotonic()
        self._prepare()
        # A cell hears only SIGTERM, from its parent (which turns every Ctrl-C into one):
        # the terminal's SIGINT reaches the whole process group and would count twice.
        old_int = signal.signal(signal.SIGINT, self._handle_signal) if self.cell is None else None
        old_term = signal.signal(signal.SIGTERM, self._handle_signal)
        try:
            self._start_children()
            self.feed = self._iter_feed()
            if self.cell is None:
                self.counter = start_counter(self.ctx, self.cfg, self.layout)
            self._loop()
        finally:
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            self._shutdown()
        return RunSummary(self.ok, self.failed, self.skipped, dict(self.reasons), time.monotonic() - t0,
                          interrupted=self.stop_signals > 0, broken_lists=tuple(self.broken_lists))

    def _loop(self) -> None:
        stopping_since: float | None = None
        last_tick = 0.0
        while True:
            if self.stop_signals and stopping_since is None:
                stopping_since = time.monotonic()
                for f in self.fetchers:
                    self._send(f, ("stop",))
                    self._unwatch(f)  # their bodies and deaths no longer matter
                # rows still waiting to be fetched are abandoned: the next run does them
                for f in self.fetchers:
                    for seq in f.holds:
                        self._abandon(seq)
                    f.holds.clear()
                for seq in self.refeed:
                    self._abandon(seq)
                self.refeed.clear()
                for _, job in self.ahead:
                    if job.seq not in self.handed:  # handed out early: in the holds above, or done
                        self._abandon(job.seq)
                self.ahead.clear()
                self.early.clear()
                self.handed.clear()
            if self.stop_signals > 1 or self.fatal:
                return
            if stopping_since is not None and time.monotonic() - stopping_since > self.cfg.shutdown_grace_s:
                log.warning("shutdown grace period over; %d rows left for the next run", len(self.rows))
                return
            if self.feed_done and not self._outstanding() and not self.refeed:
                return
            if stopping_since is not None and not self._outstanding():
                return
            self._dispatch_bodies()
            self._flush_writer()
            self._post_all()
            dead: list[tuple[str, int]] = []
            for key, _ in self.sel.select(0.2):
                kind, idx, child = key.data
                if kind.endswith("-dead"):
                    dead.append((kind[:-5], idx))
                    continue
                try:
                    while True:
                        for msg in child.conn.recv():
                            if kind == "fetcher":
                                self._on_fetcher(idx, msg)
                            elif kind == "worker":
                                self._on_worker(idx, msg)
                            elif msg[0] == "written":
                                self._written(msg[1])
                            elif msg[0] == "released":
                                self._released(msg[1])
                            elif msg[0] == "fatal":
                                self.fatal = msg[1]
                        if not child.readable():
                            break
                except (EOFError, OSError):
                    pass  # dies with it; the sentinel reports it
            for kind, idx in dead:
                self._on_death(kind, idx)
            self._update_gauges()
            self._reap_counter()
            now = time.monotonic()
            if self.on_tick and now - last_tick >= 0.5:
                last_tick = now
                self.on_tick(self)

    def _abandon(self, seq: int) -> None:
        """Forget a row not fetched yet (stopping): the next run does it."""
        r = self.rows.pop(seq, None)
        if r is not None:
            self.by_id.pop(self._key(r.row), None)

    def _reap_counter(self) -> None:
        # The counter exits within seconds of the start; reaped now, not at the end of the
        # run, it does not sit in the process table as <defunct> for hours.
        counter = getattr(self, "counter", None)
        if counter is not None and not counter.is_alive():  # is_alive() waits for it (WNOHANG)
            counter.join(0)
            self.counter = None

    def _update_gauges(self) -> None:
        s = self.stats
        s.set(F.QUEUED_BODIES, len(self.bodies))
        s.set(F.QUEUED_WRITES, len(self.writer.holds) - self.in_shards if self.writer else 0)
        s.set(F.HEARTBEAT_MS, int(time.monotonic() * 1000))

    def _shutdown(self) -> None:
        graceful = self.stop_signals <= 1 and not self.fatal
        others = [c for c in (*self.fetchers, *self.workers) if c is not None]
        for c in others:
            self._send(c, ("stop",))
        self._post_all()
        if self.writer is not None:
            if graceful:
                self._flush_writer()
            self._send(self.writer, ("stop",))
            self._post_all()
            # The writer commits what it holds, acknowledges it, then exits: count those rows.
            deadline = time.monotonic() + (10.0 if graceful else 1.0)
            try:
                while time.monotonic() < deadline and self.writer.conn.poll(max(0.0, deadline - time.monotonic())):
                    for msg in self.writer.conn.recv():
                        if msg[0] == "written":
                            self._written(msg[1])
                        elif msg[0] == "released":
                            self._released(msg[1])
                        elif msg[0] == "fatal":
                            self.fatal = msg[1]
            except (EOFError, OSError):
                pass
        counter = getattr(self, "counter", None)
        if counter is not None and counter.is_alive():
            counter.kill()
        if counter is not None:
            counter.join(2.0)
        children = [*others, *([self.writer] if self.writer else [])]
        deadline = time.monotonic() + (5.0 if graceful else 0.5)
        for c in children:
            c.proc.join(max(0.0, deadline - time.monotonic()))
        for c in children:
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(2.0)
            c.close_outbox()
            if c.sender is not None:
                c.sender.join(1.0)
            c.conn.close()
        if hasattr(self, "sel"):
            self.sel.close()
        if hasattr(self, "stats"):
            self.stats.close()
        if hasattr(self, "slab"):
            self.slab.close()
        if hasattr(self, "db"):
            self.db.close()
        if self.cell is None:  # a cell's parent removes it once every cell is done
            shutil.rmtree(self.cfg.output.tmp_dir, ignore_errors=True)
        if self.fatal:
            raise RunError(self.fatal)


def start_counter(ctx, cfg: RunConfig, layout: StatsLayout) -> mp.process.BaseProcess:  # noqa: ANN001
    """Counting a 9M-row list takes seconds of CPU: a process of its own keeps it off the
    routing loop's GIL. It writes the total into the stats and exits."""
    p = ctx.Process(target=count_main, args=(cfg.lists, cfg.subset, cfg.limit, layout), name="oidl-counter", daemon=True)
    p.start()
    return p


def count_main(lists: tuple[str, ...], subset: str | None, limit: int | None, layout: StatsLayout) -> None:
    """Child process: count the rows of the run's lists for the progress total and ETA."""
    from .proc import child_init

    child_init("counter")
    os.nice(10)  # only the ETA waits for it: never take a core from the pipeline at start-up
    n = 0
    for path in lists:  # one by one: a list that breaks part-way leaves the others' count
        try:
            n += inputs.count_rows([path], subset=subset)
        except inputs.ListError:
            pass  # the run reports list errors itself; the count only feeds the progress and ETA
    if limit is not None:
        n = min(n, limit)
    stats = Stats.attach(layout, None)
    try:
        stats.m[0, F.EXPECTED] = n  # a cell only this process writes
    finally:
        stats.close()
