"""The monitor process: everything an operator looks at, out of the data path.

The Prometheus exporter, the web UI and the terminal UI all run here, in one child process
spawned by ``run_engine`` (same 'spawn' context, :func:`engine.proc.child_init`, so it dies
with the supervisor). It attaches the stats segment (counters + :mod:`engine.board`)
read-only and never sends anything to the engine: the supervisor's routing loop does not pay
for rendering, HTTP or psutil, and a slow browser or scraper cannot slow a download.

Life cycle (driven by :class:`Monitor` in the main process):

1. ``start()`` spawns the process, which binds its ports first and answers ``ready`` with the
   URLs, or ``error`` (port in use...) so the run stops before it begins, with a clear message;
2. ``attach(layout)`` (first supervisor tick) hands over the stats segment; the TUI starts;
3. ``stop()`` after the run: a last frame, the terminal restored, the process joined (killed
   if it does not go). The supervisor alone creates and unlinks the segment.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import psutil

from .board import Board
from .overlay import BoxLookup
from .stats import F, Role, Stats, StatsLayout, reason_counts

#: how often the monitor samples the stats for rates, charts and the UIs
SAMPLE_EVERY_S = 1.0
#: chart history kept (and sent to a browser that connects)
HISTORY_S = 15 * 60
#: window of the displayed rates, and the (longer) one the ETA uses
RATE_WINDOW_S = 10.0
ETA_WINDOW_S = 60.0
_READY_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 5.0


class MonitorError(Exception):
    """The monitor could not start (a port in use, a bad address): said before the run starts."""


@dataclass(frozen=True)
class MonitorConfig:
    tui: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    web_host: str = "127.0.0.1"
    web_port: int | None = None
    out_dir: Path = Path(".")
    #: ``--annotations`` with ``--format files``: the gallery draws boxes (engine.overlay)
    boxes: bool = False
    #: (variant name, resize mode) of every variant: how boxes map into a gallery file
    variant_modes: tuple[tuple[str, str], ...] = ()
    #: the run's process counts: every labelled metric has its series from the first scrape
    fetchers: int = 1
    workers: int = 1
    cells: int = 1

    @property
    def needed(self) -> bool:
        return self.tui or self.metrics_port is not None or self.web_port is not None


def proc_name(layout: StatsLayout, row: int) -> str:
    role, idx = layout.role_of(row)
    if role in (Role.SUPERVISOR, Role.WRITER):
        if layout.cells == 1:
            return role.value
        # with routing cells, "supervisor" is the thin parent; each cell's supervisor is "cell-k"
        return f"cell-{idx}" if role is Role.SUPERVISOR else f"writer-{idx}"
    return f"{role.value}-{idx}"


def child_rows(layout: StatsLayout) -> range:
    """Rows of processes other than the main one (which the monitor knows as its parent)."""
    return range(1 if layout.cells == 1 else 0, layout.rows)


def ring_rows(layout: StatsLayout, m) -> list[dict]:  # noqa: ANN001 - the stats matrix
    """Every fetcher's and worker's ring, from the start: 0 slots until the child publishes them."""
    rings = []
    for row in range(2 * layout.cells, layout.rows):
        owned = int(m[row, F.OWNED_SLOTS])
        role, _ = layout.role_of(row)
        rings.append({"process": proc_name(layout, row), "ring": "fetch" if role is Role.FETCHER else "output",
                      "slots": owned, "used": max(0, owned - int(m[row, F.FREE_SLOTS]))})
    return rings


class ProcessTable:
    """psutil handles for every engine process (by the PID each child writes in its row)."""

    def __init__(self, layout: StatsLayout) -> None:
        self.layout = layout
        self.procs: dict[str, psutil.Process] = {}
        self.cpu_last: dict[str, tuple[float, float]] = {}

    def pids(self, m) -> dict[str, int]:  # noqa: ANN001 - the stats matrix
        out = {"supervisor": os.getppid(), "monitor": os.getpid()}
        for row in child_rows(self.layout):
            pid = int(m[row, F.PID])
            if pid > 0:
                out[proc_name(self.layout, row)] = pid
        return out

    def sample(self, m) -> list[dict]:  # noqa: ANN001
        """CPU seconds, CPU % since the last sample, RSS of each live process."""
        out = []
        now = time.monotonic()
        for name, pid in self.pids(m).items():
            p = self.procs.get(name)
            try:
                if p is None or p.pid != pid:
                    p = self.procs[name] = psutil.Process(pid)
                    self.cpu_last.pop(name, None)
                with p.oneshot():
                    t = p.cpu_times()
                    rss = p.memory_info().rss
            except psutil.Error:
                self.procs.pop(name, None)
                continue
            cpu = t.user + t.system
            last = self.cpu_last.get(name)
            pct = 100.0 * (cpu - last[1]) / max(1e-6, now - last[0]) if last else 0.0
            self.cpu_last[name] = (now, cpu)
            out.append({"name": name, "pid": pid, "cpu_s": cpu, "cpu_pct": pct, "rss": rss})
        return out


class LiveData:
    """Reads the shared stats and board; keeps the history the rates and charts need."""

    def __init__(self, stats: Stats, out_dir: Path, boxes: BoxLookup | None = None) -> None:
        self.stats = stats
        self.boxes = boxes
        self.layout = stats.layout
        self.board = Board.of(stats)
        self.out_dir = out_dir
        self.procs = ProcessTable(stats.layout)
        self.t0_wall = time.time()
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        # (monotonic t, done, downloaded bytes, written bytes)
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=int(HISTORY_S / SAMPLE_EVERY_S) + 2)
        # chart points: (wall t, images/s, net B/s, disk B/s)
        self.history: deque[tuple[float, float, float, float]] = deque(maxlen=int(HISTORY_S / SAMPLE_EVERY_S))
        self.current: dict = {}
        self.gallery: dict[str, str] = {}  # image id -> relative path of its smallest file
        # rows that stand for whole machines (a --ray driver's nodes): row -> node name
        self.row_names: dict[int, str] = {}
        self.node_samples: deque[tuple[float, dict[int, int]]] = deque(maxlen=int(RATE_WINDOW_S / SAMPLE_EVERY_S) + 2)

    def _rate(self, window_s: float) -> tuple[float, float, float]:
        s = self.samples
        if len(s) < 2:
            return 0.0, 0.0, 0.0
        last = s[-1]
        first = last
        for x in reversed(s):
            first = x
            if last[0] - x[0] >= window_s:
                break
        dt = max(1e-6, last[0] - first[0])
        return (last[1] - first[1]) / dt, (last[2] - first[2]) / dt, (last[3] - first[3]) / dt

    def sample(self) -> dict:
        """Take a sample and rebuild the view every UI reads. Called once per SAMPLE_EVERY_S."""
        m = self.stats.snapshot()
        now = time.monotonic()

        def tot(f: int) -> int:
            return int(m[:, f].sum())

        ok, failed = tot(F.IMAGES_OK), tot(F.IMAGES_FAILED)
        done = ok + failed
        self.samples.append((now, done, tot(F.DOWNLOADED_BYTES), tot(F.WRITTEN_BYTES)))
        ips, net, disk = self._rate(RATE_WINDOW_S)
        eta_ips = self._rate(ETA_WINDOW_S)[0]
        self.history.append((time.time(), ips, net, disk))
        expected = int(m[0, F.EXPECTED])
        skipped = tot(F.SKIPPED)
        todo = expected - skipped if expected >= 0 else None
        pct = min(100.0, 100.0 * done / todo) if todo else (100.0 if todo == 0 else None)
        eta = (todo - done) / eta_ips if todo is not None and eta_ips > 0 else None
        rings = ring_rows(self.layout, m)
        transfers = self.board.read_transfers()
        recent_ok = self.board.read_finished(True)
        for r in recent_ok:
            if r["text"]:
                self.gallery[r["name"]] = r["text"]
        if len(self.gallery) > 400:  # only recent rows are servable; forget old ones
            keep = {r["name"] for r in recent_ok}
            self.gallery = {k: v for k, v in self.gallery.items() if k in keep}
        view = {
            "nodes": self._nodes(m, now),
            "t": time.time(),
            "elapsed_s": now - self.t0,
            "expected": expected if expected >= 0 else None,
            "skipped": skipped,
            "ok": ok,
            "failed": failed,
            "done": done,
            "todo": todo,
            "pct": pct,
            "eta_s": eta,
            "images_per_s": ips,
            "net_bps": net,
            "disk_bps": disk,
            "downloaded_bytes": tot(F.DOWNLOADED_BYTES),
            "written_bytes": tot(F.WRITTEN_BYTES),
            "files_written": tot(F.FILES_WRITTEN),
            "retries": tot(F.RETRIES),
            "transfers_done": tot(F.TRANSFERS_DONE),
            "downloads_in_progress": tot(F.DOWNLOADS_IN_PROGRESS),
            "transfers_target": tot(F.TRANSFERS_TARGET),
            "resizes_in_progress": tot(F.RESIZES_IN_PROGRESS),
            "reasons": {r: n for r, n in reason_counts(m).items() if n},
            "queues": {"fetch": tot(F.PARKED), "worker": int(m[: self.layout.cells, F.QUEUED_BODIES].sum()),
                       "writer": int(m[: self.layout.cells, F.QUEUED_WRITES].sum())},
            "rings": rings,
            "processes": self.procs.sample(m),
            "transfers": transfers[:100],
            "resizes": self.board.read_resizes(),
            "recent_ok": recent_ok,
            "recent_failed": self.board.read_finished(False),
            "point": self.history[-1],
            "boxes": self.boxes is not None,
        }
        with self.lock:
            self.current = view
        return view

    def _nodes(self, m, now: float) -> list[dict]:  # noqa: ANN001 - the stats matrix
        """Per-node totals and images/s over the rate window (rows named by the Ray driver)."""
        if not self.row_names:
            return []
        done = {row: int(m[row, F.IMAGES_OK] + m[row, F.IMAGES_FAILED]) for row in self.row_names}
        self.node_samples.append((now, done))
        t0, first = self.node_samples[0]
        dt = now - t0
        out = []
        for row, name in sorted(self.row_names.items(), key=lambda kv: kv[1]):
            rate = (done[row] - first.get(row, 0)) / dt if dt > 0 else 0.0
            out.append({"name": name, "ok": int(m[row, F.IMAGES_OK]), "failed": int(m[row, F.IMAGES_FAILED]),
                        "images_per_s": rate, "downloaded_bytes": int(m[row, F.DOWNLOADED_BYTES]),
                        "written_bytes": int(m[row, F.WRITTEN_BYTES])})
        return out

    def view(self) -> dict:
        with self.lock:
            return self.current

    def history_points(self) -> list[tuple[float, float, float, float]]:
        with self.lock:
            return list(self.history)

    def image_path(self, image_id: str) -> Path | None:
        """The smallest file of a recently written image, or None (never an arbitrary path)."""
        with self.lock:
            rel = self.gallery.get(image_id)
        if not rel:
            return None
        p = self.out_dir / rel
        return p if p.is_file() else None

    def image_boxes(self, image_id: str) -> dict | None:
        """The boxes of a recently written image, mapped into its gallery file; None if not on the board."""
        with self.lock:
            rel = self.gallery.get(image_id)
        if not rel:
            return None
        if self.boxes is None:
            return {"image_id": image_id, "boxes": [], "note": "the run has no --annotations"}
        return self.boxes.boxes(image_id, rel)


# -- the process ------------------------------------------------------------------------------
class _Holder:
    """Filled once the supervisor hands over the segment; servers read ``data`` (None before).

    Before that, ``layout`` (the run's process counts, no segment) and ``procs`` let the
    exporter answer the first scrapes with every metric at zero instead of leaving them out.
    """

    def __init__(self, layout: StatsLayout | None = None) -> None:
        self.data: LiveData | None = None
        self.layout = layout
        self.procs = ProcessTable(layout) if layout is not None else None
        self.t0 = time.monotonic()
        self.t0_wall = time.time()


def monitor_main(conn: Connection, cfg: MonitorConfig) -> None:
    from .proc import child_init

    child_init("monitor")
    # The TUI must restore the terminal even when the supervisor dies: ask the kernel for a
    # catchable SIGTERM instead of child_init's SIGKILL, and turn it into a clean exit.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    holder = _Holder(StatsLayout("", cfg.fetchers, cfg.workers, cfg.cells))
    urls: dict[str, str] = {}
    servers: list[Callable[[], None]] = []
    try:
        if cfg.metrics_port is not None:
            from .exporter import serve_metrics

            close, url = serve_metrics(holder, cfg.metrics_host, cfg.metrics_port)
            servers.append(close)
            urls["metrics"] = url
        if cfg.web_port is not None:
            from .web import serve_web

            close, url = serve_web(holder, cfg.web_host, cfg.web_port)
            servers.append(close)
            urls["web"] = url
    except OSError as e:
        what = "the web UI" if "metrics" in urls else "metrics"
        host, port = (cfg.web_host, cfg.web_port) if "metrics" in urls or cfg.metrics_port is None else (
            cfg.metrics_host, cfg.metrics_port)
        conn.send(("error", f"cannot serve {what} on {host}:{port}: {e.strerror or e}"))
        return
    conn.send(("ready", urls))
    stats: Stats | None = None
    tui = None
    try:
        while True:
            if not conn.poll(None):
                continue
            msg = conn.recv()
            if msg[0] == "attach":
                stats = Stats.attach(msg[1], None)
                boxes = BoxLookup(cfg.out_dir, dict(cfg.variant_modes)) if cfg.boxes else None
                holder.data = LiveData(stats, cfg.out_dir, boxes)
                holder.data.sample()
                break
            if msg[0] == "stop":
                return
        if cfg.tui:
            from .tui import Tui

            tui = Tui()
            tui.__enter__()
        data = holder.data
        assert data is not None
        while True:
            view = data.sample()
            if tui is not None:
                tui.render(view)
            if conn.poll(SAMPLE_EVERY_S):
                msg = conn.recv()
                if msg[0] == "names":
                    data.row_names = dict(msg[1])
                elif msg[0] == "stop":
                    view = data.sample()
                    if tui is not None:
                        tui.render(view)
                    break
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        if tui is not None:
            tui.__exit__(None, None, None)
        for close in servers:
            close()
        holder.data = None


class Monitor:
    """The main process's handle on the monitor process."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.proc: mp.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.attached = False
        self.urls: dict[str, str] = {}

    @classmethod
    def for_run(cls, run) -> "Monitor | None":  # noqa: ANN001 - engine.config.RunConfig
        from .cells import cell_count

        web_port = run.web_port if run.web_port is not None else (0 if run.ui == "web" else None)
        cells = cell_count(run)
        cfg = MonitorConfig(
            tui=run.ui == "tui",
            metrics_host=run.metrics_host,
            metrics_port=run.metrics_port,
            web_host=run.web_host,
            web_port=web_port,
            out_dir=run.output.out_dir,
            boxes=run.output.annotations is not None and not run.output.sharded,
            variant_modes=tuple((v.name, str(v.mode)) for v in run.pipeline.variants),
            fetchers=max(1, run.fetch.fetchers) * cells,  # as the supervisors start them
            workers=max(1, run.workers),
            cells=cells,
        )
        return cls(cfg) if cfg.needed else None

    def start(self) -> dict[str, str]:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=monitor_main, args=(child, self.cfg), name="oidl-monitor", daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(_READY_TIMEOUT_S):
            self.stop()
            raise MonitorError("the monitor process did not start")
        try:
            msg = parent.recv()
        except EOFError:
            self.stop()
            raise MonitorError("the monitor process died while starting") from None
        if msg[0] == "error":
            self.stop()
            raise MonitorError(msg[1])
        self.urls = msg[1]
        return self.urls

    def attach(self, layout: StatsLayout) -> None:
        if self.attached or self.conn is None:
            return
        self.attached = True
        try:
            self.conn.send(("attach", layout))
        except OSError:
            pass

    def name_rows(self, names: dict[int, str]) -> None:
        """Name stats rows that stand for whole machines (a --ray driver's nodes) for the UIs."""
        if self.conn is None:
            return
        try:
            self.conn.send(("names", dict(names)))
        except OSError:
            pass

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.conn is not None:
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
        self.proc.join(_STOP_TIMEOUT_S)
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: the TUI still restores the terminal
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        if self.conn is not None:
            self.conn.close()
        self.proc = None
        self.conn = None


__all__ = ["LiveData", "Monitor", "MonitorConfig", "MonitorError"]
