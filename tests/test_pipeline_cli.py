"""Issue 3 end to end: every image case through the real CLI, a real loopback server and the state DB.

Each case is generated here with pyvips (helpers adapted from ``test_images.py``, which tests
the pipeline function case by case); this file checks what a user sees after ``oidl-engine
run``: the status and reason of every row, and for ``ok`` rows every variant file — its size
per mode, plain 3-band sRGB without a profile, colours against a colour-managed reference,
upright by aspect and by content — all from one pass that fetches each URL once.
"""

from __future__ import annotations

import csv
import hashlib
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from conftest import run_cli
from test_images import QUADS, STORE_FOR_ORIENTATION, card, crafted_png, jpeg, oriented_jpeg, solid, strip_segment
from engine.corpus import md5_b64
from engine.inputs import OPENIMAGES_COLUMNS
from engine.loopback import LoopbackServer

pyvips = pytest.importorskip("pyvips")

# Muted colours inside the generic CMYK gamut, and saturated ones where Display P3 and sRGB differ.
PATCHES = [(200, 120, 80), (90, 140, 60), (70, 90, 150), (180, 180, 180), (230, 210, 120), (120, 60, 90)]
VIVID = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (0, 200, 200), (40, 40, 40)]
PATCH_PX = 64  # sources are 3 x 2 patches: 192 x 128, landscape 3:2
SRC = (3 * PATCH_PX, 2 * PATCH_PX)
BACKGROUND = (0, 0, 255)  # not white: proves --background reaches alpha flattening and pad

# One variant per mode: spec -> (directory and outputs.variant, extension, mode, box).
VARIANTS = ("96", "64:fill-crop:webp:q80", "80x64:pad:png", "40x60:fill-distort")
NAMES = {
    "96": ("96", "jpg", "shrink", (96, 96)),
    "64:fill-crop:webp:q80": ("64-fill-crop-webp-q80", "webp", "fill-crop", (64, 64)),
    "80x64:pad:png": ("80x64-pad-png", "png", "pad", (80, 64)),
    "40x60:fill-distort": ("40x60-fill-distort", "jpg", "fill-distort", (40, 60)),
}
COMMON = ["run", "--procs", "2", "--ui", "none", "--max-retries", "0", "--background", ",".join(map(str, BACKGROUND))]



# -- image generators (see test_images.py) ---------------------------------------------------


def patches(colours: list[tuple[int, int, int]]) -> pyvips.Image:
    return pyvips.Image.arrayjoin([solid(PATCH_PX, PATCH_PX, c) for c in colours], across=3)


def patch_means(img: pyvips.Image) -> list[list[float]]:
    """Mean colour of the middle half of each patch (edges skipped: JPEG rings there)."""
    scale = img.width / SRC[0]
    side = max(1, int(PATCH_PX / 2 * scale))
    out = []
    for i in range(6):
        x0 = int(((i % 3) * PATCH_PX + PATCH_PX / 4) * scale)
        y0 = int(((i // 3) * PATCH_PX + PATCH_PX / 4) * scale)
        region = img.crop(x0, y0, side, side)
        out.append([region[b].avg() for b in range(3)])
    return out


def noisy_photo() -> pyvips.Image:
    """Realistic entropy, so cuts land inside entropy-coded data."""
    noise = pyvips.Image.gaussnoise(320, 240, sigma=40, mean=128, seed=42)
    return noise.bandjoin([noise.flip("horizontal"), noise.flip("vertical")]).cast("uchar").copy(interpretation="srgb")


def damaged_jpeg() -> bytes:
    """1 KiB of garbage mid-scan: libjpeg warns ("Corrupt JPEG data") but decodes a full image."""
    body = bytearray(jpeg(noisy_photo()))
    mid = len(body) // 2
    body[mid : mid + 1024] = random.Random(1).randbytes(1024)
    return bytes(body)


def rgba_png() -> tuple[bytes, list[list[float]]]:
    """Half-transparent patches, and the reference: the same flattened on BACKGROUND."""
    rgba = patches(PATCHES).bandjoin((pyvips.Image.black(*SRC) + 128).cast("uchar"))
    return rgba.pngsave_buffer(), patch_means(rgba.flatten(background=list(BACKGROUND)))


# -- the cases ------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    body: bytes
    status: str = "ok"
    reason: str | None = None
    fmt: str = "jpeg"  # what the engine finds by sniffing (DB `format`)
    colours: list | None = None  # colour-managed reference patch means, for ok rows
    upright: bool = False  # the card: check orientation by aspect and content
    rotation: str = ""  # the list's Rotation column
    size: tuple[int, int] = SRC  # source size as stored
    alpha: bool = False  # png and webp outputs keep the alpha band; jpeg ones are flattened
    turns: int = 0  # counterclockwise quarter turns expected in the output (--apply-rotation)
    image_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.image_id = hashlib.sha1(self.name.encode()).hexdigest()[:16]


def colour_cases() -> list[Case]:
    cases = [
        Case("srgb", jpeg(patches(PATCHES)), colours=PATCHES),
        Case("progressive", jpeg(patches(PATCHES), interlace=True), colours=PATCHES),
        Case("palette png", patches(PATCHES).pngsave_buffer(palette=True), fmt="png", colours=PATCHES),
        Case("gif behind .jpg", patches(PATCHES).gifsave_buffer(), fmt="gif", colours=PATCHES),
        Case("webp behind .jpg", patches(PATCHES).webpsave_buffer(Q=95), fmt="webp", colours=PATCHES),
    ]
    sixteen = (patches(PATCHES).cast("ushort") * 257).copy(interpretation="rgb16").cast("ushort")
    cases.append(Case("16-bit png", sixteen.pngsave_buffer(bitdepth=16), fmt="png", colours=PATCHES))
    grey = patches(PATCHES).colourspace("b-w")
    cases.append(Case("grayscale", jpeg(grey), colours=[[v[0]] * 3 for v in patch_means(grey.bandjoin([grey, grey]))]))
    body, reference = rgba_png()
    cases.append(Case("rgba png", body, fmt="png", colours=reference, alpha=True))
    # Display P3: the raw numbers are far from sRGB; the reference is lcms on the decoded file.
    p3 = jpeg(patches(VIVID).icc_transform("p3", input_profile="srgb"))
    cases.append(Case("display p3", p3, colours=patch_means(pyvips.Image.new_from_buffer(p3, "").icc_transform(
        "srgb", embedded=True))))
    # CMYK: with its profile, without (Adobe-style inverted, APP14), without APP14 either.
    cmyk = patches(PATCHES).icc_transform("cmyk", input_profile="srgb")
    cmyk_ref = patch_means(cmyk.icc_transform("srgb", input_profile="cmyk"))
    with_icc = cmyk.jpegsave_buffer(Q=95, keep="all")
    no_icc = cmyk.jpegsave_buffer(Q=95, keep="none")
    assert pyvips.Image.new_from_buffer(with_icc, "").get_typeof("icc-profile-data")
    assert b"Adobe" in no_icc and not pyvips.Image.new_from_buffer(no_icc, "").get_typeof("icc-profile-data")
    cases += [
        Case("cmyk icc", with_icc, colours=cmyk_ref),
        Case("cmyk adobe inverted", no_icc, colours=cmyk_ref),
        Case("cmyk no app14", strip_segment(no_icc, b"\xff\xee"), colours=cmyk_ref),
    ]
    return cases


def orientation_cases() -> list[Case]:
    cases = [Case(f"exif {o}", oriented_jpeg(o, SRC), upright=True) for o in range(1, 9)]
    progressive = STORE_FOR_ORIENTATION[6](card(*SRC)).copy()
    progressive.set_type(pyvips.GValue.gint_type, "orientation", 6)
    cases.append(Case("progressive exif 6", jpeg(progressive, interlace=True), upright=True))
    # Without --apply-rotation the Rotation column is ignored: upright as the EXIF says.
    cases.append(Case("rotation ignored", oriented_jpeg(6, SRC), upright=True, rotation="90.0"))
    return cases


def failure_cases() -> list[Case]:
    photo = noisy_photo()
    base = jpeg(photo)
    prog = jpeg(photo, interlace=True)
    png = photo.pngsave_buffer(compression=1)
    assert base.endswith(b"\xff\xd9") and prog.endswith(b"\xff\xd9")
    bad_png = bytearray(png)
    idat = bad_png.index(b"IDAT")
    bad_png[idat + 200 : idat + 264] = random.Random(7).randbytes(64)
    jpeg_cuts = (20, 200, len(base) // 2, len(base) - 2)  # -2: everything but the EOI marker
    cases = [Case(f"jpeg cut at {c}", base[:c], "failed", "truncated") for c in jpeg_cuts]
    cases += [Case(f"progressive cut at {c}", prog[:c], "failed", "truncated") for c in (len(prog) // 3, len(prog) - 2)]
    cases += [Case(f"png cut at {c}", png[:c], "failed", "truncated") for c in (len(png) // 2, len(png) - 12)]
    bomb = crafted_png(60_000, 60_000, rows=4)
    assert len(bomb) < 4096  # 3.6 G pixels announced in a few hundred bytes
    return cases + [
        Case("png header lies", crafted_png(600, 400, rows=3), "failed", "truncated"),
        Case("png bad data", bytes(bad_png), "failed", "corrupt"),
        Case("bomb", bomb, "failed", "too_many_pixels"),
        Case("html", b"<!DOCTYPE html><html><body>Photo unavailable</body></html>", "failed", "not_an_image"),
        Case("xml", b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code></Error>', "failed", "not_an_image"),
        Case("empty", b"", "failed", "empty"),
        Case("damaged but complete", damaged_jpeg(), size=(320, 240)),  # warnings only: ok unless --strict
    ]


def strict_rotation_cases() -> list[Case]:
    """Second run: --png discard --apply-rotation --strict."""
    body, _ = rgba_png()
    cases = [
        Case("discarded png", body, "failed", "png_discarded"),
        Case("discarded gray png", crafted_png(60, 40, rows=40), "failed", "png_discarded"),
        Case("strict damaged", damaged_jpeg(), "failed", "corrupt"),
        Case("strict clean", jpeg(patches(PATCHES)), colours=PATCHES),
        Case("strict gif stays ok", patches(PATCHES).gifsave_buffer(), fmt="gif", colours=PATCHES),
    ]
    for orientation in (1, 6):
        for turns, text in ((0, ""), (1, "90.0"), (2, "180.0"), (3, "270.0")):
            cases.append(Case(f"exif {orientation} rotation {text or 'empty'}", oriented_jpeg(orientation, SRC),
                              upright=True, rotation=text, turns=turns))
    return cases


# -- running --------------------------------------------------------------------------------


def write_cases(root: Path, cases: list[Case]) -> None:
    """Every body behind a .jpg URL, whatever it holds (as on Flickr)."""
    for c in cases:
        path = root / "images" / f"{c.image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(c.body)


def write_list(path: Path, cases: list[Case], base_url: str) -> Path:
    """A v4+ Open Images list (12 columns, with Rotation), size and MD5 of the file as served."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow((*OPENIMAGES_COLUMNS, "Rotation"))
        for c in cases:
            url = f"{base_url}/images/{c.image_id}.jpg"
            w.writerow([c.image_id, "train", url, "", "", "", "", c.name, len(c.body), md5_b64(c.body), url,
                        c.rotation])
    return path


@dataclass(frozen=True)
class Row:
    status: str
    reason: str | None
    detail: str | None
    width: int | None
    height: int | None
    format: str | None


def db_images(db: Path) -> dict[str, Row]:
    conn = sqlite3.connect(db)
    try:
        q = "SELECT image_id, status, reason, detail, width, height, format FROM images"
        return {r[0]: Row(*r[1:]) for r in conn.execute(q)}
    finally:
        conn.close()


def db_outputs(db: Path) -> dict[str, dict[str, tuple[str, int, int]]]:
    conn = sqlite3.connect(db)
    try:
        out: dict[str, dict[str, tuple[str, int, int]]] = {}
        for image_id, variant, path, w, h in conn.execute("SELECT image_id, variant, path, width, height FROM outputs"):
            out.setdefault(image_id, {})[variant] = (path, w, h)
        return out
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LoopbackServer, dict[str, list[Case]]]]:
    root = tmp_path_factory.mktemp("pipeline-corpus")
    runs = {"main": colour_cases() + orientation_cases() + failure_cases(), "strict": strict_rotation_cases()}
    for cases in runs.values():
        write_cases(root, cases)
    with LoopbackServer(root) as server:
        yield root, server, runs


# -- checks ---------------------------------------------------------------------------------


def decode_output(path: Path, alpha: bool = False) -> pyvips.Image:
    """The decoded output, checked to be plain 8-bit sRGB: 3 bands, plus alpha where asked."""
    img = pyvips.Image.new_from_file(str(path), access="sequential").copy_memory()
    bands = 4 if alpha else 3
    assert img.bands == bands and img.format == "uchar" and img.interpretation == "srgb", (path, img.bands)
    assert not img.get_typeof("icc-profile-data"), f"{path} carries an ICC profile"
    return img


def colour_error(img: pyvips.Image, reference: list) -> tuple[float, float]:
    """(mean, max) absolute difference of the patch means against the reference, in 8-bit levels."""
    diffs = [abs(g - float(r)) for gp, rp in zip(patch_means(img), reference) for g, r in zip(gp, rp)]
    return sum(diffs) / len(diffs), max(diffs)


def quadrants_upright(img: pyvips.Image) -> bool:
    w, h = img.width, img.height
    points = {"tl": (w // 4, h // 4), "tr": (3 * w // 4, h // 4), "bl": (w // 4, 3 * h // 4),
              "br": (3 * w // 4, 3 * h // 4)}
    got = {k: img.getpoint(x, y)[:3] for k, (x, y) in points.items()}
    return all(abs(g - want) <= 40 for k, rgb in QUADS.items() for g, want in zip(got[k], rgb))


def expected_size(mode: str, box: tuple[int, int], source: tuple[int, int]) -> tuple[int, int]:
    """Output size per mode: shrink fits inside the box and never upscales; the others are the box."""
    if mode != "shrink":
        return box
    scale = min(box[0] / source[0], box[1] / source[1], 1.0)
    return round(source[0] * scale), round(source[1] * scale)


def check_ok_row(
    out: Path, c: Case, row: Row, outputs: dict[str, tuple[str, int, int]], variants: tuple[str, ...]
) -> None:
    portrait = c.turns % 2 == 1
    oriented = (c.size[1], c.size[0]) if portrait else c.size
    assert (row.width, row.height) == oriented, c.name  # the DB has the source size as oriented
    assert row.format == c.fmt, c.name
    specs = [NAMES[v] for v in variants]
    assert sorted(outputs) == sorted(n for n, *_ in specs), c.name  # every variant, from this one pass
    for name, ext, mode, box in specs:
        rel, w, h = outputs[name]
        assert rel == f"{name}/{c.image_id[:3]}/{c.image_id}.{ext}", (c.name, rel)
        img = decode_output(out / rel, alpha=c.alpha and ext in ("png", "webp"))
        want = expected_size(mode, box, oriented)
        assert (img.width, img.height) == (w, h) == want, (c.name, name, img.width, img.height)
        if c.upright and c.turns == 0:
            assert quadrants_upright(img), (c.name, name)
    shrunk = decode_output(out / outputs["96"][0])
    if c.colours is not None:
        mean, worst = colour_error(shrunk, c.colours)
        assert mean <= 3 and worst <= 8, (c.name, mean, worst)
    if c.upright and c.turns == 0:
        assert shrunk.width > shrunk.height, c.name  # upright by aspect too
    if portrait:
        # A quarter turn counterclockwise of the upright card, compared pixel by pixel.
        expected = card(*SRC).rot({1: "d270", 3: "d90"}[c.turns])
        diff = (shrunk.cast("float") - expected.resize(shrunk.width / expected.width).cast("float")).abs().avg()
        assert diff < 20, (c.name, diff)
    elif c.turns == 2:
        assert quadrants_upright(shrunk.rot("d180")), c.name


def run_and_check(tmp_path: Path, served: tuple, run: str, variants: tuple[str, ...], *flags: str) -> None:
    _, server, runs = served
    cases: list[Case] = runs[run]
    lst = write_list(tmp_path / "images.csv", cases, server.base_url)
    out = tmp_path / "out"
    server.reset_stats()
    args = [*COMMON, *flags, lst, "--out", out]
    for v in variants:
        args += ["--variant", v]
    p = run_cli(args, timeout_s=60, check=True)
    db = out / "oidl.sqlite"
    rows = db_images(db)
    outputs = db_outputs(db)
    assert len(rows) == len(cases), p.stderr
    wrong = {c.name: (rows[c.image_id].status, rows[c.image_id].reason, rows[c.image_id].detail)
             for c in cases if (rows[c.image_id].status, rows[c.image_id].reason) != (c.status, c.reason)}
    assert not wrong, wrong
    for c in cases:
        if c.status == "ok":
            check_ok_row(out, c, rows[c.image_id], outputs.get(c.image_id, {}), variants)
        else:
            assert c.image_id not in outputs, c.name  # a failed row leaves no file behind
            assert not list(out.glob(f"*/*/{c.image_id}.*")), c.name
    # One pass: every URL was fetched exactly once (no retry, no second download for a variant).
    stats = server.stats()
    assert stats["total_requests"] == len(cases), stats
    assert sorted(stats["requests"].values()) == [1] * len(cases), stats["requests"]


def test_every_case_through_the_cli(tmp_path: Path, served: tuple) -> None:
    run_and_check(tmp_path, served, "main", VARIANTS)


def test_png_discard_apply_rotation_strict(tmp_path: Path, served: tuple) -> None:
    run_and_check(tmp_path, served, "strict", ("96", "80x64:pad:png"),
                  "--png", "discard", "--apply-rotation", "--strict")
