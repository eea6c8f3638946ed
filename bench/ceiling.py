"""The CPU ceiling: decode + resize + encode of the benchmark files, from memory, nothing else.

``measure_ceiling`` runs the engine's own image pipeline (:func:`engine.images.process`,
with the same :class:`~engine.variants.PipelineConfig` and the same libvips set-up:
``init_worker``, i.e. one libvips thread, no operation cache) in ``procs`` processes that
take files from a shared counter, so a large image does not leave a core idle at the end.
No network, no IPC, no disk writes: what the engine does on top of this is its overhead.

Other modes, same files, same processes and counter:

==================  ==========================================================================
``pipeline``        the engine's pipeline as configured (JPEG fast path on: the default)
``pyvips``          the engine's pipeline with every image on the pyvips path (the ceiling
                    the engine was measured against before the fast path)
``thumbnail``       naive pyvips: ``thumbnail_buffer`` (a cascade of ``thumbnail_image`` for
                    several sizes) and ``jpegsave_buffer``, no validation
``fastest-turbo``   the fastest pipeline we could build from libraries: libjpeg-turbo
                    (simplejpeg) decode at the smallest DCT scale for the largest size, OpenCV
                    ``INTER_AREA`` cascade, libjpeg-turbo encode; no validation, no EXIF/ICC
``fastest-opencv``  OpenCV alone: ``imdecode`` (``IMREAD_REDUCED_COLOR_2/4/8`` when one size
                    allows it, else full), ``INTER_AREA`` cascade, ``imencode``
==================  ==========================================================================

The two ``fastest-*`` recipes make the same outputs as the engine (quality ``quality``,
4:4:4 chroma at q90 and above, 4:2:0 below, as libvips' ``subsample_mode=auto``), so the
comparison is like for like; the harness reports the faster of the two as "fastest".

Files are read inside the timed loop from the page cache (the caller warms it): ~50 µs for a
250 KB file next to ~10 ms of decoding, and it keeps 12,000 files out of each process's heap.
"""

from __future__ import annotations

import math
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
    mode: str  # one of MODES
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


def _fit(w: int, h: int, size: int) -> tuple[int, int]:
    s = min(size / w, size / h, 1.0)
    return max(1, round(w * s)), max(1, round(h * s))


def _fastest_turbo(body: bytes, sizes: Sequence[int], quality: int) -> None:
    import cv2
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(body)
    order = sorted(sizes, reverse=True)
    s = min(order[0] / w, order[0] / h, 1.0)
    img = simplejpeg.decode_jpeg(body, min_width=math.ceil(w * s), min_height=math.ceil(h * s))
    chroma = "444" if quality >= 90 else "420"
    for size in order:
        tw, th = _fit(w, h, size)
        if (img.shape[1], img.shape[0]) != (tw, th):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        simplejpeg.encode_jpeg(img, quality, "RGB", chroma)


def _fastest_opencv(body: bytes, sizes: Sequence[int], quality: int) -> None:
    import cv2
    import numpy as np
    import simplejpeg

    h, w, _, _ = simplejpeg.decode_jpeg_header(body)  # OpenCV has no header-only read
    order = sorted(sizes, reverse=True)
    tw, th = _fit(w, h, order[0])
    flag = cv2.IMREAD_COLOR
    for k, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if w // k >= tw and h // k >= th:
            flag = reduced
            break
    img = cv2.imdecode(np.frombuffer(body, np.uint8), flag)
    sampling = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444 if quality >= 90 else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    for size in order:
        tw, th = _fit(w, h, size)
        if (img.shape[1], img.shape[0]) != (tw, th):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        ok, _ = cv2.imencode(".jpg", img, params)
        if not ok:
            raise ValueError("imencode failed")


MODES = ("pipeline", "pyvips", "thumbnail", "fastest-turbo", "fastest-opencv")


def _worker(
    paths: Sequence[str],
    modes: Sequence[str],
    sizes: Sequence[int],
    quality: int,
    counters: Sequence[Any],
    barrier: Any,
    results: Any,
) -> None:
    from engine import images
    from engine.errors import RowFailed
    from engine.variants import PipelineConfig, parse_sizes

    images.init_worker()  # also one OpenCV thread
    variants = parse_sizes(",".join(map(str, sizes)), default_quality=quality)

    def one(mode: str, cfg: PipelineConfig, path: str) -> bool:
        body = Path(path).read_bytes()
        try:
            if mode in ("pipeline", "pyvips"):
                images.process(body, cfg)
            elif mode == "thumbnail":
                _thumbnail_all(body, sizes, quality)
            elif mode == "fastest-turbo":
                _fastest_turbo(body, sizes, quality)
            else:
                _fastest_opencv(body, sizes, quality)
        except RowFailed:
            return False
        except Exception:  # a decoder error on the other paths: a broken file, counted like a failure
            return False
        return True

    for mode, counter in zip(modes, counters):
        cfg = PipelineConfig(variants=variants, jpeg_fast_path=mode != "pyvips")
        for path in paths[:_WARMUP_IMAGES]:
            one(mode, cfg, path)
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
            failed += not one(mode, cfg, paths[i])
        results.put((mode, t0, time.monotonic(), _cpu_s() - c0, done, failed))
        barrier.wait()  # the next mode's warm-up must not overlap this mode's last images


def measure_ceilings(
    paths: Sequence[Path], sizes: Sequence[int], quality: int, procs: int, modes: Sequence[str] = ("pipeline",)
) -> dict[str, CeilingResult]:
    """Process ``paths`` once per mode, modes one after the other, in the same ``procs`` fresh
    processes (spawn, as the engine does; one start-up for every mode), and time each mode."""
    if not sizes:
        raise ValueError("the ceiling needs at least one size")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown ceiling mode {mode!r}; known: {', '.join(MODES)}")
    ctx = mp.get_context("spawn")
    counters = [ctx.Value("q", 0) for _ in modes]
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    names = [str(p) for p in paths]
    env_before = os.environ.get("VIPS_CONCURRENCY")
    os.environ["VIPS_CONCURRENCY"] = "1"  # as the engine's workers (engine.images sets it before import)
    try:
        workers = [
            ctx.Process(target=_worker, args=(names, tuple(modes), tuple(sizes), quality, counters, barrier, results))
            for _ in range(procs)
        ]
        for w in workers:
            w.start()
    finally:
        if env_before is None:
            os.environ.pop("VIPS_CONCURRENCY", None)
        else:
            os.environ["VIPS_CONCURRENCY"] = env_before
    got = [results.get(timeout=3600) for _ in range(procs * len(modes))]
    for w in workers:
        w.join()
    out = {}
    for mode in modes:
        mine = [r for r in got if r[0] == mode]
        out[mode] = CeilingResult(
            mode=mode,
            procs=procs,
            images=sum(r[4] for r in mine),
            failed=sum(r[5] for r in mine),
            wall_s=max(r[2] for r in mine) - min(r[1] for r in mine),
            cpu_s=sum(r[3] for r in mine),
        )
    return out


def measure_ceiling(
    paths: Sequence[Path], sizes: Sequence[int], quality: int, procs: int, mode: str = "pipeline"
) -> CeilingResult:
    """One mode of :func:`measure_ceilings`."""
    return measure_ceilings(paths, sizes, quality, procs, (mode,))[mode]
