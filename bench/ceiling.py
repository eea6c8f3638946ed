"""The CPU ceiling: decode + resize + encode of the benchmark files, from memory, nothing else.

``measure_ceiling`` runs the engine's own image pipeline (:func:`engine.images.process`,
with the same :class:`~engine.variants.PipelineConfig` and the same libvips set-up:
``init_worker``, i.e. one libvips thread, no operation cache) in ``procs`` processes that
take files from a shared counter, so a large image does not leave a core idle at the end.
No network, no IPC, no disk writes: what the engine does on top of this is its overhead.

``mode="thumbnail"`` is the naive reference instead: ``thumbnail_buffer`` (a cascade of
``thumbnail_image`` for several sizes) and ``jpegsave_buffer``, no validation. It shows what
the pipeline's validation and colour handling cost, not a goal.

Files are read inside the timed loop from the page cache (the caller warms it): ~50 µs for a
250 KB file next to ~10 ms of decoding, and it keeps 12,000 files out of each process's heap.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

_WARMUP_IMAGES = 2  # first calls load libjpeg tables and build libvips classes


@dataclass(frozen=True)
class CeilingResult:
    mode: str  # "pipeline" | "thumbnail"
    procs: int
    images: int
    failed: int
    wall_s: float  # from the common start barrier to the last process done
    cpu_s: float  # user + system over all processes, timed loop only

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "procs": self.procs,
            "images": self.images,
            "failed": self.failed,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "images_per_s": round(self.images_per_s, 2),
            "cpu_ms_per_image": round(1000 * self.cpu_s / max(1, self.images), 2),
        }


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thumbnail_all(body: bytes, sizes: Sequence[int], quality: int) -> None:
    import pyvips

    order = sorted(sizes, reverse=True)
    img = pyvips.Image.thumbnail_buffer(body, order[0], size="down", option_string="fail_on=error")
    if len(order) > 1:
        img = img.copy_memory()
    img.jpegsave_buffer(Q=quality, keep="none")
    for size in order[1:]:
        img = img.thumbnail_image(size, size="down").copy_memory()
        img.jpegsave_buffer(Q=quality, keep="none")


def _worker(
    paths: Sequence[str],
    mode: str,
    sizes: Sequence[int],
    quality: int,
    counter: Any,
    barrier: Any,
    results: Any,
) -> None:
    from engine import images
    from engine.errors import RowFailed
    from engine.variants import PipelineConfig, parse_sizes

    images.init_worker()
    cfg = PipelineConfig(variants=parse_sizes(",".join(map(str, sizes)), default_quality=quality))

    def one(path: str) -> bool:
        body = Path(path).read_bytes()
        try:
            if mode == "pipeline":
                images.process(body, cfg)
            else:
                _thumbnail_all(body, sizes, quality)
        except RowFailed:
            return False
        except Exception:  # pyvips.Error from the naive path: a broken file, counted like a failure
            return False
        return True

    for path in paths[:_WARMUP_IMAGES]:
        one(path)
    barrier.wait()
    t0, c0 = time.monotonic(), _cpu_s()
    done = failed = 0
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(paths):
            break
        done += 1
        failed += not one(paths[i])
    results.put((t0, time.monotonic(), _cpu_s() - c0, done, failed))


def measure_ceiling(
    paths: Sequence[Path], sizes: Sequence[int], quality: int, procs: int, mode: str = "pipeline"
) -> CeilingResult:
    """Process ``paths`` in ``procs`` fresh processes (spawn, as the engine does) and time it."""
    if not sizes:
        raise ValueError("the ceiling needs at least one size")
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    names = [str(p) for p in paths]
    env_before = os.environ.get("VIPS_CONCURRENCY")
    os.environ["VIPS_CONCURRENCY"] = "1"  # as the engine's workers (engine.images sets it before import)
    try:
        workers = [
            ctx.Process(target=_worker, args=(names, mode, tuple(sizes), quality, counter, barrier, results))
            for _ in range(procs)
        ]
        for w in workers:
            w.start()
    finally:
        if env_before is None:
            os.environ.pop("VIPS_CONCURRENCY", None)
        else:
            os.environ["VIPS_CONCURRENCY"] = env_before
    got = [results.get(timeout=3600) for _ in workers]
    for w in workers:
        w.join()
    start = min(r[0] for r in got)
    end = max(r[1] for r in got)
    return CeilingResult(
        mode=mode,
        procs=procs,
        images=sum(r[3] for r in got),
        failed=sum(r[4] for r in got),
        wall_s=end - start,
        cpu_s=sum(r[2] for r in got),
    )
