"""Running a command under measurement: wall clock, CPU, memory of its whole process tree.

- wall clock: from just before ``Popen`` to the exit of the command (start-up included);
- CPU: ``getrusage(RUSAGE_CHILDREN)`` before and after, which covers every descendant that
  was waited for (the engine's supervisor joins all its children), so nothing is missed
  between samples; per-role CPU comes from the last psutil sample of each process;
- memory: psutil samples of the tree every ``interval_s``, summed over processes: RSS (what
  the issue's goal names; shared-memory pages are counted once per process that touched
  them) and PSS (shared pages split between their users: the honest sum).
"""

from __future__ import annotations

import os
import re
import resource
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil

_ROLE_RE = re.compile(r"-\d+$")


@dataclass
class TreeStats:
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_procs: int = 0
    #: (seconds since start, summed RSS, summed PSS) per sample
    series: list[tuple[float, int, int]] = field(default_factory=list)
    #: last CPU seconds seen per process, keyed by pid; role = comm without a trailing -N
    cpu_by_pid: dict[int, tuple[str, float]] = field(default_factory=dict)
    #: with a progress probe: (seconds since start, rows done, {pid: (name, CPU s)}) per sample
    progress: list[tuple[float, int, dict[int, tuple[str, float]]]] = field(default_factory=list)

    def cpu_by_role(self) -> dict[str, float]:
        roles: dict[str, float] = {}
        for name, cpu in self.cpu_by_pid.values():
            role = _ROLE_RE.sub("", name)
            roles[role] = roles.get(role, 0.0) + cpu
        return {k: round(v, 2) for k, v in sorted(roles.items())}


class TreeSampler(threading.Thread):
    """Samples the memory and CPU of ``pid`` and all its descendants until stopped."""

    def __init__(
        self, pid: int, interval_s: float = 0.25, t0: float | None = None, progress: Callable[[], int] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.probe = progress
        self.interval_s = interval_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.stats = TreeStats()
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            self.sample(root)
            self._stop_event.wait(self.interval_s)

    def sample(self, root: psutil.Process) -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        for p in procs:
            try:
                with p.oneshot():
                    info = p.memory_full_info()
                    cpu = p.cpu_times()
                    name = p.name()
            except psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            self.stats.cpu_by_pid[p.pid] = (name, cpu.user + cpu.system)
        s = self.stats
        s.peak_rss_bytes = max(s.peak_rss_bytes, rss)
        s.peak_pss_bytes = max(s.peak_pss_bytes, pss)
        s.peak_procs = max(s.peak_procs, len(procs))
        t = round(time.monotonic() - self.t0, 2)
        s.series.append((t, rss, pss))
        if self.probe is not None:
            s.progress.append((t, self._done(), {pid: s.cpu_by_pid[pid] for pid in (p.pid for p in procs) if pid in s.cpu_by_pid}))

    def _done(self) -> int:
        assert self.probe is not None
        try:
            return self.probe()
        except Exception:  # noqa: BLE001 - e.g. the DB does not exist yet
            return 0

    def stop(self) -> TreeStats:
        self._stop_event.set()
        self.join()
        if self.probe is not None:
            # the rows done at the end: a short (smoke) run can end between two samples below
            # the steady-state window's upper mark; the CPU is each process's last sample
            done = self._done()
            s = self.stats
            if not s.progress or done > s.progress[-1][1]:
                s.progress.append((round(time.monotonic() - self.t0, 2), done, dict(s.cpu_by_pid)))
        return self.stats


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    tree: TreeStats
    first_done_s: float | None = None  # time to the first finished image, where probed
    stderr_tail: str = ""
    stderr: str = ""

    def as_json(self, images: int) -> dict[str, Any]:
        return {
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 3),
            "images": images,
            "images_per_s": round(images / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "cpu_s": round(self.cpu_s, 2),
            "cpu_ms_per_image": round(1000 * self.cpu_s / max(1, images), 2),
            "peak_rss_mib": round(self.tree.peak_rss_bytes / 2**20, 1),
            "peak_pss_mib": round(self.tree.peak_pss_bytes / 2**20, 1),
            "peak_procs": self.tree.peak_procs,
            "cpu_s_by_role": self.tree.cpu_by_role(),
            **({"first_done_s": round(self.first_done_s, 3)} if self.first_done_s is not None else {}),
        }


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 3600.0,
    stop_after_s: float | None = None,
    first_done: Callable[[], bool] | None = None,
    stop_after_first_s: float | None = None,
    interval_s: float = 0.25,
    progress: Callable[[], int] | None = None,
) -> RunResult:
    """Run ``cmd`` to completion (or SIGINT it after ``stop_after_s``) and measure it.

    ``first_done`` is polled every 20 ms until it returns True, to time the first image;
    with ``stop_after_first_s`` the run is stopped that long after it (smoke runs).
    """
    cpu0 = _children_cpu_s()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sampler = TreeSampler(proc.pid, interval_s, t0, progress)
    sampler.start()
    stderr_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    first_done_s: float | None = None
    try:
        deadline = t0 + (stop_after_s if stop_after_s is not None else timeout_s)
        while proc.poll() is None and time.monotonic() < deadline:
            if first_done is not None and first_done_s is None:
                try:
                    if first_done():
                        first_done_s = time.monotonic() - t0
                        if stop_after_first_s is not None:
                            deadline = min(deadline, time.monotonic() + stop_after_first_s)
                except Exception:
                    pass  # e.g. the DB does not exist yet
            time.sleep(0.02)
        if proc.poll() is None:
            # Ctrl-C: the engine drains and commits what is in flight, then exits.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        wall = time.monotonic() - t0
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        tree = sampler.stop()
    reader.join(timeout=5)
    text = b"".join(stderr_chunks).decode(errors="replace")
    return RunResult(list(cmd), proc.returncode, wall, _children_cpu_s() - cpu0, tree, first_done_s, text[-3000:], text)


def db_counts(db_path: Path) -> dict[str, int]:
    """Rows per status in an engine state DB (empty if there is none)."""
    if not db_path.exists():
        return {}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return {status: n for status, n in con.execute("SELECT status, count(*) FROM images GROUP BY status")}
    finally:
        con.close()


def db_done(db_path: Path) -> int:
    """Rows finished (ok or failed) in an engine state DB, 0 if there is none yet."""
    if not db_path.exists():
        return 0
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
    try:
        return int(con.execute("SELECT count(*) FROM images").fetchone()[0])
    finally:
        con.close()


def steady_state(progress: Sequence[tuple[float, int, dict[int, tuple[str, float]]]], total: int,
                 lo: float = 0.25, hi: float = 0.75) -> dict[str, Any] | None:
    """CPU of every process between ``lo`` and ``hi`` of the rows done, per image of the run.

    Start-up (imports, rings filling) and the tail (last bodies, shutdown) are left out: what
    remains is what each process costs per image while the run is at full speed, which is
    what caps a bigger host. Per kind (process name without its trailing -N): how many
    processes, the busiest one's CPU ms per image, and the rate at which that one process
    would fill a core (its ceiling).
    """
    # the last sample at or before lo and the first at or after hi: two samples even when a
    # short (smoke) run crosses both marks between two of them
    if not progress:
        return None
    ia = next((i for i in range(len(progress) - 1, -1, -1) if progress[i][1] <= lo * total), 0)
    ib = next((i for i in range(len(progress)) if progress[i][1] >= hi * total), None)
    if ib is None:
        return None
    a, b = progress[ia], progress[ib]
    if b[1] <= a[1] or b[0] <= a[0]:
        return None
    images = b[1] - a[1]
    # A process that exits inside the window (on a short run the workers may be gone by the
    # time the last rows are committed) counts with its last sampled CPU.
    last: dict[int, tuple[str, float]] = {}
    for x in progress[ia : ib + 1]:
        last.update(x[2])
    kinds: dict[str, dict[str, Any]] = {}
    for pid, (name, cpu1) in last.items():
        cpu0 = a[2].get(pid, (name, 0.0))[1]
        ms = 1000 * (cpu1 - cpu0) / images
        k = kinds.setdefault(_ROLE_RE.sub("", name), {"processes": 0, "max_ms_per_image": 0.0, "sum_ms_per_image": 0.0})
        k["processes"] += 1
        k["max_ms_per_image"] = max(k["max_ms_per_image"], ms)
        k["sum_ms_per_image"] += ms
    for k in kinds.values():
        k["ceiling_images_per_s"] = round(1000 / k["max_ms_per_image"]) if k["max_ms_per_image"] > 0 else None
        k["max_ms_per_image"] = round(k["max_ms_per_image"], 3)
        k["sum_ms_per_image"] = round(k["sum_ms_per_image"], 3)
    return {
        "window_s": round(b[0] - a[0], 2),
        "images": images,
        "images_per_s": round(images / (b[0] - a[0]), 2),
        "cpu_ms_per_image": round(sum(k["sum_ms_per_image"] for k in kinds.values()), 3),
        "kinds": dict(sorted(kinds.items())),
    }


def db_failure_reasons(db_path: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT reason, count(*) FROM images WHERE status = 'failed' GROUP BY reason")
        return {str(reason): n for reason, n in rows}
    finally:
        con.close()


def db_has_ok_row(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
    try:
        return con.execute("SELECT 1 FROM images WHERE status = 'ok' LIMIT 1").fetchone() is not None
    finally:
        con.close()


def warm_page_cache(paths: Sequence[Path]) -> int:
    """Read every file once so neither side of a comparison pays for the disk."""
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def process_cpu_s(pids: Sequence[int]) -> float:
    """Current user+system CPU seconds of these processes (the server's own cost)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def env_without(names: Sequence[str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
