"""Step 3 of the data flow: pyvips worker processes.

A worker receives ``(seq, slots, nbytes)`` for a downloaded body, reads it in place when its
slots are consecutive (a memoryview of the slab straight into libjpeg-turbo; otherwise one
joined copy, ~20 µs for 200 KB), computes its MD5 there (and checks it against
``OriginalMD5``: workers multiply with ``--procs``, the fetcher does not, so this ~0.5 ms
per 275 KB body is not on a single process), runs the image pipeline
(:func:`engine.images.process`: one decode, validation, every variant) and writes the encoded
variants into its own output slots. Slots are never freed here: the supervisor frees them
after the writer has put the bytes on disk, so a worker that dies mid-image loses nothing —
the body is still in the slab and is handed to another worker.

One worker per core with libvips concurrency 1 is the fastest arrangement: measured, two
1-thread processes resize ~2x the images of one, one 2-thread process no more than one.
"""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import NamedTuple

from .board import Board, WorkerBoard
from .errors import Reason, RowFailed
from .proc import pipeline_child
from .ring import Slab, SlotRange, slots_needed
from .stats import HIST_PROCESS_BASE, F, Role, Stats, StatsLayout
from .variants import PipelineConfig

log = logging.getLogger(__name__)


class OutputRef(NamedTuple):
    variant: str
    ext: str
    slots: tuple[int, ...]
    nbytes: int
    width: int
    height: int


class Decoded(NamedTuple):
    width: int
    height: int
    format: str
    outputs: tuple[OutputRef, ...]
    warnings: int


def worker_main(
    index: int,
    conn: Connection,
    cfg: PipelineConfig,
    slab_name: str,
    slot_bytes: int,
    slots: SlotRange,
    free: list[int],
    layout: StatsLayout,
) -> None:
    with pipeline_child(f"worker-{index}", slab_name, slot_bytes, layout, Role.WORKER, index) as (slab, stats):
        # pyvips is imported here, after the process exists: libvips' thread pool and GLib
        # state must never be inherited through fork (fork after they start can deadlock).
        from . import images

        images.init_worker()
        stats.set(F.OWNED_SLOTS, len(slots))
        stats.set(F.FREE_SLOTS, len(free))
        try:
            _loop(conn, cfg, slab, len(slots), free, stats, images, Board.of(stats).worker(index))
        except (EOFError, OSError):
            pass  # the supervisor is gone


def _loop(
    conn: Connection, cfg: PipelineConfig, slab: Slab, owned: int, free: list[int], stats: Stats, images,  # noqa: ANN001
    board: WorkerBoard,
) -> None:
    pending: deque = deque()  # jobs that arrived while we waited for output slots
    while True:
        if not pending:
            pending.extend(conn.recv())
        msg = pending.popleft()
        kind = msg[0]
        if kind == "slots":
            free.extend(msg[1])
            continue
        if kind == "stop":
            return
        _, seq, body_slots, nbytes, rotation, md5_expected = msg
        stats.set(F.RESIZES_IN_PROGRESS, 1)
        t0 = time.monotonic()
        board.start(seq, nbytes, t0)
        body = slab.body(body_slots, nbytes)
        md5 = hashlib.md5(body).hexdigest()
        try:
            if md5_expected is not None and md5 != md5_expected:
                raise RowFailed(Reason.MD5_MISMATCH, f"md5 {md5}, list says {md5_expected}")
            result = images.process(body, cfg, rotation_deg=rotation)
        except RowFailed as e:
            out: tuple = ("failed", e.reason.value, e.detail)
        except MemoryError:
            out = ("failed", Reason.TOO_MANY_PIXELS.value, "out of memory while decoding")
        except Exception as e:  # a bug or a libvips surprise: fail this row, keep the worker
            log.error("image %s: unexpected error\n%s", seq, traceback.format_exc())
            out = ("failed", Reason.INTERNAL.value, f"{type(e).__name__}: {e}")
        else:
            try:
                refs = _store_outputs(conn, slab, owned, free, pending, result.outputs)
            except RowFailed as e:
                out = ("failed", e.reason.value, e.detail)
            else:
                out = ("ok", Decoded(result.width, result.height, result.format, refs, result.warnings))
        del body  # before forget: a view must not outlive our use of those pages
        slab.forget(body_slots, nbytes)
        stats.observe(HIST_PROCESS_BASE, time.monotonic() - t0)
        stats.add(F.IMAGES_PROCESSED)
        stats.set(F.RESIZES_IN_PROGRESS, 0)
        board.idle()
        stats.set(F.FREE_SLOTS, len(free))
        conn.send([("done", seq, out, md5)])


def _store_outputs(
    conn: Connection, slab: Slab, owned: int, free: list[int], pending: deque, outputs  # noqa: ANN001
) -> tuple[OutputRef, ...]:
    sb = slab.slot_bytes
    need_total = sum(slots_needed(len(o.data), sb) for o in outputs)
    if need_total > owned:
        raise RowFailed(Reason.TOO_LARGE, "encoded outputs larger than the worker's output ring")
    # Wait for the writer to hand slots back if needed (bounded: the writer never waits on us).
    while len(free) < need_total:
        for msg in conn.recv():
            if msg[0] == "slots":
                free.extend(msg[1])
            elif msg[0] == "stop":
                raise EOFError
            else:
                pending.append(msg)
    refs = []
    for o in outputs:
        n = slots_needed(len(o.data), sb)
        slots = [free.pop() for _ in range(n)]
        slab.write(slots, o.data)
        refs.append(OutputRef(o.variant, o.ext, tuple(slots), len(o.data), o.width, o.height))
    return tuple(refs)
