"""Scale-out on one host: several routing cells under a thin parent.

One supervisor routes every message of its fetchers, workers and writer, and one fetcher,
one writer and one supervisor each spend a fixed amount of CPU per image (libcurl's receive
path, file creation, routing). Whatever does not multiply with ``--procs`` caps the run:
at ~0.3-0.6 ms per image each, a 32-core host could not pass ~2,000 images/s. So the
work is split into **cells**: each cell is a complete :class:`~engine.supervisor.Supervisor`
with its own fetchers, workers, writer and shared-memory slab, in a process of its own,
and takes the rows whose ImageID hashes to it (:func:`~engine.supervisor.cell_of`). The
number of cells grows with ``--procs`` (one per :data:`WORKERS_PER_CELL` workers), so every
per-image cost lives in a process kind that multiplies.

The parent only prepares the run (output directories, leftovers removed, state DB, lists
registered), creates the one stats segment every process of every cell reports into (so
the exporter, TUI, web UI and progress line read one matrix, as with one cell), starts the
cells and the row counter, forwards signals, restarts a cell that dies, and reports. It
touches no row: its CPU per image is zero.

Guarantees, cell by cell as before, and across cells because
- rows are partitioned by ImageID, so a row (and every duplicate of it) belongs to exactly
  one cell, in every run: exactly-once holds per cell, hence for the run;
- there is one state DB in WAL mode with one writer process per cell; SQLite serialises
  their transactions (each a batch of rows, milliseconds long; ``busy_timeout`` 30 s);
- politeness caps are divided, not multiplied: cell *k* gets an exact share of
  ``--max-connections`` and ``--max-host-connections`` (the shares add up to the cap; there
  are never more cells than the per-host cap), so a host never sees more connections from
  the run than the cap. Rows of one host spread over every cell, so each cell keeps its
  whole share busy (partitioning by host would leave all but one cell idle on a list with
  one host). A 429/503 back-off is learnt per fetcher, as with several fetchers in one cell;
- a cell that dies (even SIGKILL) takes its children with it (PDEATHSIG); the parent
  removes its slab and starts it again, and the new instance reads the lists from the top,
  skipping what the DB has: rows in flight are simply done again. The parent dying takes
  every cell with it, as a supervisor takes its children.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import signal
import sys
import time
from dataclasses import replace
from multiprocessing import resource_tracker
from multiprocessing.connection import wait
from typing import Callable

from .config import RunConfig
from .proc import child_init
from .ring import remove_stale_segments
from .stats import F, Stats, reason_counts
from .supervisor import CellSpec, RunError, RunSummary, Supervisor, prepare_run, start_counter

log = logging.getLogger("oidl")

#: pyvips workers per routing cell when --cells is not given. A cell's supervisor, fetcher
#: and writer together cost ~1 ms of CPU per image; four workers make ~450 images/s at
#: 256 px, so those three stay under a quarter of a core each and never bound the cell.
WORKERS_PER_CELL = 4
#: a cell restarted more often than this is broken, not unlucky
_MAX_RESTARTS = 5


def cell_count(cfg: RunConfig) -> int:
    """Cells for this run: --cells, else one per WORKERS_PER_CELL workers; never more than
    the workers, nor than the connection caps can be divided into (at least one each)."""
    if cfg.output.sharded:
        return 1  # shard numbers are handed out by one writer: sharded formats run in one cell
    n = cfg.cells or -(-cfg.workers // WORKERS_PER_CELL)
    return max(1, min(n, cfg.workers, cfg.fetch.max_host_connections, cfg.fetch.max_connections))


def _share(total: int, parts: int, k: int) -> int:
    """Part ``k`` of ``total`` split in ``parts`` as evenly as possible (shares add up to total)."""
    return total // parts + (1 if k < total % parts else 0)


def cell_config(cfg: RunConfig, cells: int, k: int) -> RunConfig:
    """Cell ``k``'s own config: its workers and its share of the connection caps."""
    f = cfg.fetch
    return replace(
        cfg,
        workers=_share(cfg.workers, cells, k),
        fetch=replace(
            f,
            max_connections=_share(f.max_connections, cells, k),
            max_host_connections=_share(f.max_host_connections, cells, k),
        ),
    )


def make_run(cfg: RunConfig, on_tick: Callable | None = None) -> "Supervisor | CellRun":
    """The run for this config: one supervisor in this process, or cells under this one."""
    if cell_count(cfg) == 1:
        return Supervisor(cfg, on_tick=on_tick)
    return CellRun(cfg, on_tick=on_tick)


class _Cell:
    def __init__(self, proc: mp.process.BaseProcess, conn, spec: CellSpec) -> None:  # noqa: ANN001
        self.proc = proc
        self.conn = conn
        self.spec = spec
        self.restarts = 0
        self.done = False


class CellRun:
    """The thin parent of a run in several cells; same interface as Supervisor (run, stats)."""

    def __init__(self, cfg: RunConfig, on_tick: Callable[["CellRun"], None] | None = None) -> None:
        self.cfg = cfg
        self.on_tick = on_tick
        self.ctx = mp.get_context("spawn")
        self.n = cell_count(cfg)
        self.cells: list[_Cell] = []
        self.stop_signals = 0
        self.fatal: str | None = None
        # every cell reads every list, so each meets the same break: reported once
        self.broken_lists: dict[str, None] = {}
        self.counter: mp.process.BaseProcess | None = None

    def _handle_signal(self, signum: int, frame: object) -> None:
        self.stop_signals += 1
        if self.stop_signals == 1:
            print(
                f"\n{signal.Signals(signum).name}: finishing the images in hand (again to stop at once)...",
                file=sys.stderr,
                flush=True,
            )
        self._signal_cells()

    def _signal_cells(self) -> None:
        # Each cell counts SIGTERMs as a supervisor counts Ctrl-Cs: first drain, second stop.
        for c in self.cells:
            if c.proc.is_alive():
                try:
                    c.proc.terminate()
                except OSError:
                    pass

    def _start_cell(self, spec: CellSpec) -> _Cell:
        parent, child = self.ctx.Pipe(duplex=False)
        level = logging.getLogger().level
        p = self.ctx.Process(
            target=cell_main, args=(cell_config(self.cfg, self.n, spec.index), spec, child, level),
            name=f"oidl-cell-{spec.index}",
        )
        p.start()
        child.close()
        return _Cell(p, parent, spec)

    def run(self) -> RunSummary:
        t0 = time.monotonic()
        cfg = self.cfg
        db, list_ids = prepare_run(cfg)
        db.close()
        cfgs = [cell_config(cfg, self.n, k) for k in range(self.n)]
        nf = [max(1, c.fetch.fetchers) for c in cfgs]
        nw = [max(1, c.workers) for c in cfgs]
        self.stats = Stats.create(sum(nf), sum(nw), self.n)
        self.layout = self.stats.layout
        old_int = signal.signal(signal.SIGINT, self._handle_signal)
        old_term = signal.signal(signal.SIGTERM, self._handle_signal)
        try:
            self.counter = start_counter(self.ctx, cfg, self.layout)
            for k in range(self.n):
                spec = CellSpec(k, self.n, self.layout, sum(nf[:k]), sum(nw[:k]), tuple(list_ids))
                self.cells.append(self._start_cell(spec))
            self._loop()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
            self._shutdown(self.counter)
        m = self.stats.snapshot()
        self.stats.close()
        summary = RunSummary(
            ok=int(m[:, F.IMAGES_OK].sum()),
            failed=int(m[:, F.IMAGES_FAILED].sum()),
            skipped=int(m[:, F.SKIPPED].sum()),
            reasons={r: n for r, n in reason_counts(m).items() if n},
            elapsed_s=time.monotonic() - t0,
            interrupted=self.stop_signals > 0,
            broken_lists=tuple(self.broken_lists),
        )
        if self.fatal:
            raise RunError(self.fatal)
        return summary

    def _loop(self) -> None:
        last_tick = 0.0
        while not all(c.done for c in self.cells):
            live = [c for c in self.cells if not c.done]
            ready = wait([x for c in live for x in (c.conn, c.proc.sentinel)], timeout=0.5)
            for c in live:
                if c.conn in ready:
                    try:
                        msg = c.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None and msg[0] == "done":
                        self.broken_lists.update(dict.fromkeys(msg[1]))
                    if msg is not None and msg[0] == "fatal" and not self.fatal:
                        # the disk is full or unwritable: every cell would meet it; stop them all
                        self.fatal = msg[1]
                        self.stop_signals = max(self.stop_signals, 1)
                        self._signal_cells()
                if c.proc.sentinel in ready:
                    self._ended(c)
            if self.counter is not None and not self.counter.is_alive():  # reaped now, not at the end
                self.counter.join(0)
                self.counter = None
            now = time.monotonic()
            if self.on_tick and now - last_tick >= 0.5:
                last_tick = now
                self.on_tick(self)

    def _ended(self, c: _Cell) -> None:
        c.proc.join()
        if c.proc.exitcode == 0 or self.stop_signals or self.fatal:
            c.done = True
            return
        k = c.spec.index
        c.restarts += 1
        if c.restarts > _MAX_RESTARTS:
            self.fatal = f"cell {k} keeps dying (exit code {c.proc.exitcode}); giving up"
            c.done = True
            self.stop_signals = max(self.stop_signals, 1)
            self._signal_cells()
            return
        log.warning("cell %d died (exit code %s); restarting it", k, c.proc.exitcode)
        self._forget_segments(c.proc.pid)
        c.conn.close()
        restarts = c.restarts
        new = self._start_cell(replace(c.spec, restarted=True))
        new.restarts = restarts
        self.cells[k] = new

    @staticmethod
    def _forget_segments(pid: int) -> None:
        """Unlink the slab of a cell that died (named after its pid), and tell the resource
        tracker all processes share, so it does not warn about it at the end."""
        for name in remove_stale_segments(creator=pid):
            try:
                resource_tracker.unregister("/" + name, "shared_memory")
            except Exception:  # noqa: BLE001 - only a warning at exit is at stake
                pass

    def _shutdown(self, counter: mp.process.BaseProcess | None) -> None:
        if counter is not None:
            if counter.is_alive():
                counter.kill()
            counter.join(2.0)
        graceful = self.stop_signals <= 1 and not self.fatal
        deadline = time.monotonic() + (self.cfg.shutdown_grace_s + 10.0 if graceful else 5.0)
        for c in self.cells:
            c.proc.join(max(0.0, deadline - time.monotonic()))
        for c in self.cells:
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(2.0)
            c.conn.close()
            if c.proc.exitcode != 0 and c.proc.pid is not None:
                self._forget_segments(c.proc.pid)
        shutil.rmtree(self.cfg.output.tmp_dir, ignore_errors=True)


def cell_main(cfg: RunConfig, spec: CellSpec, conn, log_level: int) -> None:  # noqa: ANN001
    """A routing cell: a whole supervisor for the rows of its partition."""
    child_init(f"cell-{spec.index}")
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.ERROR)
    try:
        summary = Supervisor(cfg, cell=spec).run()
    except RunError as e:
        conn.send(("fatal", str(e)))
        sys.exit(3)
    conn.send(("done", summary.broken_lists))
