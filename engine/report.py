"""Plain-mode progress: one concise line every few seconds, and the final summary.

Reads only the shared stats (and the supervisor's recent-rows lists), never the data path.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO

from .stats import F, Stats


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def human_duration(s: float) -> str:
    s = int(max(0, s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


class Rates:
    """Rates over a sliding window of stats snapshots."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: list[tuple[float, int, int, int]] = []

    def update(self, stats: Stats) -> tuple[float, float, float]:
        now = time.monotonic()
        done = stats.total(F.IMAGES_OK) + stats.total(F.IMAGES_FAILED)
        sample = (now, done, stats.total(F.DOWNLOADED_BYTES), stats.total(F.WRITTEN_BYTES))
        self.samples.append(sample)
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.pop(0)
        t0, d0, n0, w0 = self.samples[0]
        dt = max(1e-6, now - t0)
        return (done - d0) / dt, (sample[2] - n0) / dt, (sample[3] - w0) / dt


class PlainReporter:
    def __init__(self, every_s: float = 5.0, stream: TextIO = sys.stderr) -> None:
        self.every_s = every_s
        self.stream = stream
        self.rates = Rates()
        self.t0 = time.monotonic()
        self.last = 0.0

    def line(self, stats: Stats) -> str:
        ips, net, disk = self.rates.update(stats)
        ok = stats.total(F.IMAGES_OK)
        failed = stats.total(F.IMAGES_FAILED)
        skipped = stats.total(F.SKIPPED)
        expected = int(stats.m[0, F.EXPECTED])
        done = ok + failed
        todo = expected - skipped if expected >= 0 else -1
        elapsed = time.monotonic() - self.t0
        if todo > 0:
            pct = 100.0 * done / todo
            eta = human_duration((todo - done) / ips) if ips > 0 else "?"
            progress = f"{done}/{todo} ({pct:.1f}%) ETA {eta}"
        else:
            progress = f"{done} done"
        return (
            f"[{human_duration(elapsed):>6}] {progress} | ok {ok} failed {failed} skipped {skipped} | "
            f"{ips:.1f} img/s | net {human_bytes(net)}/s | disk {human_bytes(disk)}/s | "
            f"downloading {stats.total(F.DOWNLOADS_IN_PROGRESS)} (target {stats.total(F.TRANSFERS_TARGET)}) "
            f"resizing {stats.total(F.RESIZES_IN_PROGRESS)}"
        )

    def tick(self, stats: Stats) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(stats), file=self.stream, flush=True)


def summary_text(ok: int, failed: int, skipped: int, reasons: dict[str, int], elapsed_s: float, interrupted: bool,
                 broken_lists: Sequence[str] = ()) -> str:
    done = ok + failed
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    state = "interrupted" if interrupted else "incomplete" if broken_lists else "finished"
    lines = [
        f"{state} in {human_duration(elapsed_s)}: "
        f"{ok} ok, {failed} failed, {skipped} already done ({rate:.1f} rows/s)"
    ]
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<16} {n}")
    if broken_lists:
        lines.append(f"{len(broken_lists)} list(s) could not be read to the end (rows after the break were not read):")
        lines.extend(f"  {text}" for text in broken_lists)
    return "\n".join(lines)
