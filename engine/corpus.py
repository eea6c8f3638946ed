"""Photo-like test images and Open Images-format image lists, for the tests, the demo and the benchmarks.

JPEG decode and encode cost depends on the content, so flat colours would flatter every benchmark:
images here are multi-scale Perlin noise with a colour tint and film grain, about 200 KB at 1024x768 q90
like a real photo. Rendering noise is slow (~0.25 s per image), so :func:`make_corpus` renders a few
dozen base images and derives every file from one of them with a random crop, flip and colour shift
before re-encoding: each file is distinct and costs ~10 ms.

``python -m engine.corpus --out DIR -n N`` writes a corpus and ``DIR/images.csv``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import functools
import gzip as gzip_module
import hashlib
import io
import json
import math
import os
import random
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import pyvips

from .inputs import OPENIMAGES_COLUMNS

_MANIFEST = "corpus.json"
_MANIFEST_VERSION = 1  # bump when the generator changes, so cached corpora are rebuilt
_BASE_WIDTH, _BASE_HEIGHT = 1280, 960  # bases leave room for 1024x768 crops at varied offsets
_MAX_BASES = 16
_ITEMS_PER_BASE = 40
_GRAIN_SIGMA = 5.0  # tuned so a 1024x768 q90 file is ~200 KB, like a real photo
_GRAIN_TILE = 1536
_QUALITY = 90
_BATCH = 64  # images derived ahead of the writing loop
_LARGE_SCALES = (2.0, 2.5, 3.0, 4.0)  # 2048x1536 … 4096x3072
_BROKEN_KINDS = ("truncated", "html", "empty")

_LICENSE = "https://creativecommons.org/licenses/by/2.0/"
# Real lists carry HTML entities, commas, quotes and non-ASCII in these free-text columns.
_AUTHORS = (
    "Daniel X. O&#x27;Neil",
    'José "Pepe" García, Jr.',
    "Zoë Müller",
    "北京摄影师",
    "Smith, John",
    "Łukasz Ż.",
    "Paris on Ponce &amp; Le Maison Rouge",
    "David",
)
_TITLES = (
    "28 Nov 2010 Our new house.",
    'The "big" day, finally',
    "Café, croissant & côte d'azur",
    "夕焼け — sunset, Tokyo",
    "...die FNF-Kerze",
    "IMG_{n:04d}.JPG",
    "Ålesund; harbour at 5 a.m.",
    "",
)


@dataclass(frozen=True)
class CorpusItem:
    image_id: str  # 16 lowercase hex chars, deterministic from seed + index
    relpath: str  # relative to the corpus root, e.g. "images/<image_id>.jpg"
    size: int  # bytes of the file as written
    md5_b64: str  # base64 of the raw 16-byte MD5 of the file (Open Images OriginalMD5 format)
    width: int
    height: int
    broken: str | None  # None for a good image, else "truncated", "html" or "empty"


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _noise_seed(*parts: object) -> int:
    # libvips seeds are C ints; derive them from the text so each (seed, part) gets its own noise.
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=1)
def _grain_tile() -> pyvips.Image:
    # Gaussian noise is the slowest generator (~0.2 s per megapixel): make one tile per process and
    # give every image its own offset into it.
    tile = pyvips.Image.gaussnoise(_GRAIN_TILE, _GRAIN_TILE, sigma=_GRAIN_SIGMA, mean=0, seed=_noise_seed("grain"))
    return tile.cast("char").copy_memory()  # signed; the final cast to uchar clips to 0..255


def _render(seed: int, width: int, height: int) -> pyvips.Image:
    """Noise "landscape" with film grain, as 3-band uchar in memory.

    Luminance: four Perlin octaves; colour: a low-frequency Perlin tint per channel; then grain.
    Cell sizes scale with the image so a larger render looks the same.
    """
    scale = max(width, height) / _BASE_WIDTH
    rng = random.Random(f"oidl-render:{seed}")

    def perlin(cell: float, part: str) -> pyvips.Image:
        return pyvips.Image.perlin(width, height, cell_size=max(2, round(cell * scale)), seed=_noise_seed(seed, part))

    lum = perlin(384, "l0") * 0.6 + perlin(96, "l1") * 0.35 + perlin(24, "l2") * 0.2 + perlin(6, "l3") * 0.08
    colour = [perlin(512, f"c{c}") * 70 + 140 for c in range(3)]
    tile = _grain_tile()
    reps_x, reps_y = math.ceil(width / tile.width) + 1, math.ceil(height / tile.height) + 1
    grain = tile.replicate(reps_x, reps_y).crop(rng.randrange(tile.width), rng.randrange(tile.height), width, height)
    lum = lum * 95 + grain
    return (lum.bandjoin([lum, lum]) + colour[0].bandjoin(colour[1:])).cast("uchar").copy_memory()


def photo_like_jpeg(seed: int, width: int = 1024, height: int = 768, quality: int = 90) -> bytes:
    """A deterministic, natural-looking JPEG (~200 KB at 1024x768 q90). ~0.3 s at 1024x768."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, got {quality}")
    return _render(seed, width, height).jpegsave_buffer(Q=quality)


@functools.lru_cache(maxsize=_MAX_BASES * 2)
def _base(seed: int, k: int) -> pyvips.Image:
    return _render(_noise_seed("base", seed, k), _BASE_WIDTH, _BASE_HEIGHT)


def image_id_for(seed: int, index: int) -> str:
    return hashlib.blake2b(f"oidl-corpus:{seed}:{index}".encode(), digest_size=8).hexdigest()


def _derive(seed: int, index: int, n_bases: int, large: bool, attempt: int) -> tuple[bytes, int, int]:
    """One distinct JPEG derived from a base: crop, flip, colour shift, optional upscale, encode."""
    rng = random.Random(f"oidl-corpus:{seed}:{index}:{attempt}")
    src = _base(seed, rng.randrange(n_bases))
    portrait = rng.random() < 0.3
    width, height = (768, 1024) if portrait else (1024, 768)
    if portrait:
        src = src.rot90()
    img = src.crop(rng.randrange(src.width - width + 1), rng.randrange(src.height - height + 1), width, height)
    if rng.random() < 0.5:
        img = img.fliphor()
    if rng.random() < 0.3:
        img = img.flipver()
    gains = [rng.uniform(0.85, 1.15) for _ in range(3)]
    offsets = [rng.uniform(-20, 20) for _ in range(3)]
    img = img.linear(gains, offsets)
    if large:
        # Nearest-neighbour keeps the grain crisp (so the file costs what a real large photo costs to
        # decode) and is 3-6x cheaper than interpolating and adding fresh grain.
        img = img.resize(rng.choice(_LARGE_SCALES), kernel="nearest")
    out = img.cast("uchar")
    return out.jpegsave_buffer(Q=_QUALITY), out.width, out.height


def _broken_body(kind: str, good_jpeg: bytes, image_id: str, rng: random.Random) -> bytes:
    if kind == "truncated":
        return good_jpeg[: int(len(good_jpeg) * rng.uniform(0.3, 0.9))]
    if kind == "html":
        return (
            "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
            f"<body><h1>Not Found</h1><p>Photo {image_id} is no longer available.</p></body></html>\n"
        ).encode()
    return b""


def _params(n: int, seed: int, broken: int, large_fraction: float) -> dict[str, object]:
    return {"version": _MANIFEST_VERSION, "n": n, "seed": seed, "broken": broken, "large_fraction": large_fraction}


def _load_cached(root: Path, params: dict[str, object]) -> list[CorpusItem] | None:
    """The manifest's items if it was written with these parameters and every file is intact (by size)."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
        if manifest.get("params") != params:
            return None
        items = [CorpusItem(**d) for d in manifest["items"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    for item in items:
        try:
            if (root / item.relpath).stat().st_size != item.size:
                return None
        except OSError:
            return None
    return items


def _old_relpaths(root: Path) -> set[str]:
    try:
        return {d["relpath"] for d in json.loads((root / _MANIFEST).read_text())["items"]}
    except (OSError, ValueError, TypeError, KeyError):
        return set()


def make_corpus(
    root: Path,
    n: int,
    *,
    seed: int = 0,
    broken: int = 0,
    large_fraction: float = 0.1,
    cache: bool = True,
) -> list[CorpusItem]:
    """Write ``n`` images under ``root/images/`` and the manifest ``root/corpus.json``; return the items.

    About 70 % landscape 1024x768, 30 % portrait 768x1024; ``round(n * large_fraction)`` of them 2-4x
    larger; ``broken`` of them broken (cycling truncated JPEG, HTML page named .jpg, empty file). The same
    arguments give byte-identical files. With ``cache`` an intact corpus written with the same arguments
    is returned as it is.
    """
    root = Path(root)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= broken <= n:
        raise ValueError(f"broken must be within 0..n ({n}), got {broken}")
    if not 0.0 <= large_fraction <= 1.0:
        raise ValueError(f"large_fraction must be within 0..1, got {large_fraction}")
    params = _params(n, seed, broken, large_fraction)
    if cache:
        cached = _load_cached(root, params)
        if cached is not None:
            return cached

    stale = _old_relpaths(root)
    (root / _MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    (root / "images").mkdir(parents=True, exist_ok=True)

    order = list(range(n))
    random.Random(f"oidl-corpus-layout:{seed}").shuffle(order)
    broken_kind = {idx: _BROKEN_KINDS[j % len(_BROKEN_KINDS)] for j, idx in enumerate(order[:broken])}
    n_large = min(n - broken, round(n * large_fraction))
    large = set(order[broken : broken + n_large])  # broken files stay small: their content is not the point
    n_bases = min(_MAX_BASES, max(1, math.ceil(n / _ITEMS_PER_BASE)))

    items: list[CorpusItem] = []
    seen_md5: set[str] = set()
    # libvips releases the GIL, so two threads can use both cores; batches bound the memory held
    # by results computed ahead of the (ordered, deterministic) writing loop.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda k: _base(seed, k), range(n_bases)))
        for batch_start in range(0, n, _BATCH):
            batch = range(batch_start, min(n, batch_start + _BATCH))
            derived = pool.map(lambda i: _derive(seed, i, n_bases, i in large, 0), batch)
            for index, (jpeg, width, height) in zip(batch, derived):
                attempt = 0
                while md5_b64(jpeg) in seen_md5:  # astronomically unlikely, but files must be distinct
                    attempt += 1
                    jpeg, width, height = _derive(seed, index, n_bases, index in large, attempt)
                image_id = image_id_for(seed, index)
                kind = broken_kind.get(index)
                rng = random.Random(f"broken:{seed}:{index}")
                body = jpeg if kind is None else _broken_body(kind, jpeg, image_id, rng)
                digest = md5_b64(body)
                seen_md5.add(digest)
                relpath = f"images/{image_id}.jpg"
                _write_atomic(root / relpath, body)
                items.append(CorpusItem(image_id, relpath, len(body), digest, width, height, kind))

    for relpath in stale - {item.relpath for item in items}:
        (root / relpath).unlink(missing_ok=True)
    manifest = {"params": params, "items": [asdict(item) for item in items]}
    _write_atomic(root / _MANIFEST, json.dumps(manifest, indent=1).encode())
    return items


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_openimages_list(
    path: Path,
    items: Sequence[CorpusItem],
    base_url: str,
    *,
    subset: str = "train",
    rotation: bool = False,
    gzip: bool = False,
) -> None:
    """Write an Open Images image list (``images.csv`` layout, V4+ ``Rotation`` column on request).

    OriginalURL and Thumbnail300KURL are ``base_url/relpath``; OriginalSize/OriginalMD5 describe the
    file as served, so a broken file passes the size/MD5 check and must be caught by decoding.
    """
    columns = OPENIMAGES_COLUMNS + (("Rotation",) if rotation else ())
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(columns)
    base = base_url.rstrip("/")
    for n, item in enumerate(items):
        url = f"{base}/{item.relpath}"
        user = f"user{int(item.image_id[:4], 16)}"
        photo_id = int(item.image_id[4:14], 16)
        row = [
            item.image_id,
            subset,
            url,
            f"https://www.flickr.com/photos/{user}/{photo_id}",
            _LICENSE,
            f"https://www.flickr.com/people/{user}/",
            _AUTHORS[n % len(_AUTHORS)],
            _TITLES[n % len(_TITLES)].format(n=n),
            str(item.size),
            item.md5_b64,
            url,
        ]
        if rotation:
            row.append("0.0")
        writer.writerow(row)
    data = buf.getvalue().encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(Path(path), gzip_module.compress(data, mtime=0) if gzip else data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.corpus",
        description="Write a photo-like JPEG corpus and an Open Images-format list (DIR/images.csv) for it.",
    )
    parser.add_argument("--out", required=True, type=Path, help="corpus directory")
    parser.add_argument("-n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broken", type=int, default=0, help="how many files are broken (truncated/html/empty)")
    parser.add_argument("--large-fraction", type=float, default=0.1, help="share of 2-4x larger images")
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="URL the corpus root will be served at (list URLs)"
    )
    args = parser.parse_args(argv)
    try:
        items = make_corpus(args.out, args.n, seed=args.seed, broken=args.broken, large_fraction=args.large_fraction)
        write_openimages_list(args.out / "images.csv", items, args.base_url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the corpus to {args.out}: {exc}", file=sys.stderr)
        return 1
    total = sum(item.size for item in items)
    print(f"{len(items)} images ({total / 1e6:.1f} MB, {args.broken} broken) in {args.out}; list: {args.out / 'images.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
