"""The image pipeline: validate one downloaded body and make every output variant from one decode.

Pure functions for the worker processes: bytes in, encoded bytes out, ``RowFailed`` for a
rejected image. No files, no DB, no processes.

Validation policy
-----------------
Rule of thumb: anything that decodes into a complete image is ``ok``; a missing part of
the image, or something that is not an image, fails with its own reason. The format is
found by sniffing the bytes, never from the URL or Content-Type.

=====================================================  ===============================================
case                                                   outcome (reason)
=====================================================  ===============================================
zero-byte body                                         failed (``empty``)
HTML, XML, SVG, JSON, text, PDF, unknown bytes         failed (``not_an_image``)
TIFF, BMP, HEIF/AVIF, JPEG 2000, JPEG XL, PSD, ICO     failed (``unsupported``)
header says width x height > ``max_pixels``            failed (``too_many_pixels``), before any decode
``--png discard`` and the body is a PNG                failed (``png_discarded``), before any decode
JPEG / PNG / GIF / WebP cut at any point, including    failed (``truncated``)
just before the JPEG EOI or inside the PNG IEND chunk
header announces more pixels than the data holds       failed (``truncated``): the decoder runs out of data
                                                       exactly as for a cut file
PNG with bad zlib data, CRC or filter bytes; JPEG      failed (``corrupt``)
with more than 100 decoder warnings; any other decode
error that is not running out of data
JPEG with "Corrupt JPEG data" or other libjpeg         ``ok``, ``warnings`` > 0 (``corrupt`` with
warnings that still decode to a full image             ``strict=True``)
progressive JPEG, CMYK or YCCK JPEG (ICC or not),      ``ok``
grayscale, 16-bit PNG, palette PNG, alpha
PNG / GIF / WebP content behind a ``.jpg`` URL         ``ok`` (``Processed.format`` says what it was)
animated GIF / WebP                                    ``ok``, first frame
junk after the JPEG EOI or after the PNG IEND chunk    ``ok`` (the image itself is complete)
GIF without its trailer byte                           ``ok`` (every frame byte is there)
=====================================================  ===============================================

One decode serves validation and every variant: the decoder runs with
``fail_on=error`` (``warning`` when strict), so truncation is found while the pixels for
the outputs are being made. Two byte checks before decoding catch what decoders let
through: a JPEG needs an EOI marker after its last scan (libjpeg may finish the last scan
without reading on) and a PNG needs its IEND chunk. With no variants the image is still
decoded fully (JPEG at 1/8 scale: every scan is still entropy-decoded).

JPEG fast path
--------------
A plain JPEG (8-bit YCbCr or grayscale, baseline or progressive, no ICC profile or an sRGB
one) is decoded with libjpeg-turbo at the smallest DCT scale that serves every variant,
resized with OpenCV and encoded with libjpeg-turbo (:mod:`engine.jpegfast`): about half
the CPU of the libvips path. libjpeg-turbo runs in strict mode, so a file it rejects or
warns about gets no output from the fast path and goes through libvips as every other
image does: the policy above, reasons and warning counts included, is the libvips path's.
``PipelineConfig.jpeg_fast_path=False`` sends everything to libvips.

Colour
------
Outputs are plain 8-bit sRGB without an embedded profile, 3 bands (grayscale becomes
3-band too, so every output decodes the same way in TensorFlow and PyTorch), plus alpha
for png/webp/avif outputs of images with alpha; JPEG outputs flatten alpha onto
``background_rgb``. CMYK and YCCK JPEGs go through lcms with their embedded profile, or
libvips' generic CMYK profile when there is none (Adobe-style inverted data, the common
case, as libjpeg-based viewers assume). Any other embedded profile (Adobe RGB, Display
P3, a gray profile) is converted to sRGB; an embedded sRGB profile is left alone (saves
building an lcms transform) and a profile that does not match the pixels (e.g. an RGB
profile on a CMYK image) is ignored. 16-bit images are scaled to 8 bits, not clipped.
A rare CMYK JPEG stored non-inverted comes out as a colour negative, exactly as in every
libjpeg-based decoder (libvips, Pillow, OpenCV): the file does not say it is.

Orientation
-----------
EXIF orientation (all 8 values) is applied to every output. With ``apply_rotation`` the
Open Images ``Rotation`` column (degrees counterclockwise: 0, 90, 180, 270; empty or NaN
means none) is applied afterwards. Box coordinates: Open Images boxes are normalised to
the image as the annotators saw it, which is the image after ``Rotation`` was applied to
the EXIF-oriented original. So with ``--apply-rotation`` the outputs line up with the
boxes; without it, the 2.6 % of images with a non-zero ``Rotation`` are upright as their
EXIF says but their boxes need the same rotation applied (a 90° turn maps a normalised
point (x, y) to (y, 1 - x)).

Memory
------
The pixel cap is checked on the header, before a single pixel is decoded, so a
decompression bomb costs a few hundred microseconds and no memory. Decoding streams
(sequential access, JPEG shrink-on-load); what is kept in memory is the largest image the
variants need (at most the source size), and a progressive JPEG additionally holds its
coefficients (about 2 bytes per pixel and component at full size), hence the cap.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass

# One image at a time per worker process: libvips threads only add overhead (measured:
# two 1-thread processes give 2x, one 2-thread process gives nothing). Must be set
# before libvips initialises, i.e. before pyvips is imported.
os.environ.setdefault("VIPS_CONCURRENCY", "1")

import pyvips  # noqa: E402

from engine import jpegfast  # noqa: E402
from engine.errors import Reason, RowFailed  # noqa: E402
from engine.variants import Mode, PipelineConfig, VariantSpec  # noqa: E402

# Decoders we expose to untrusted bytes. Everything else libvips could load (TIFF, HEIF,
# SVG, PDF, matrix, raw...) stays blocked: more formats mean more attack surface, and
# none of them is a photo format on the web we need.
_ALLOWED_LOADERS = ("VipsForeignLoadJpeg", "VipsForeignLoadPng", "VipsForeignLoadWebp", "VipsForeignLoadNsgif")

_EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png", "avif": "avif"}
_JPEG_SHRINKS = (8, 4, 2)
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
# The fast path decodes into one array; above this many pixels at the needed DCT scale it
# leaves the image to libvips, which streams (3 bytes per pixel: 120 MB per worker at most).
_FAST_MAX_DECODED_PX = 40_000_000
# Words the decoders use when the data ends early (libjpeg, libpng, nsgif, libvips).
_TRUNCATION_HINTS = ("premature end of jpeg", "not enough", "unexpected end", "truncat", "end of file", "out of data")
# Rotation column quarter turns counterclockwise -> libvips clockwise rotation.
_ROT_FOR_TURNS = {1: "d270", 2: "d180", 3: "d90"}


@dataclass(frozen=True)
class Encoded:
    variant: str  # VariantSpec.name
    ext: str  # file extension without dot (png when --png keep keeps a PNG)
    data: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Processed:
    width: int  # source width/height as oriented (after EXIF orientation and Rotation)
    height: int
    format: str  # the real format found by sniffing: jpeg, png, webp, gif
    outputs: tuple[Encoded, ...]  # one per variant, in cfg.variants order
    warnings: int  # decoder warnings seen for this image


class _WarningCounter(logging.Handler):
    """Counts libvips warnings (forwarded by pyvips to the "pyvips" logger) for one image."""

    _KEEP_MESSAGES = 8  # enough to classify a failure, bounded for pathological files

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("VIPS: read gave"):
            return  # libvips' summary of the warnings already counted one by one
        self.count += 1
        if len(self.messages) < self._KEEP_MESSAGES:
            self.messages.append(message)

    def reset(self) -> None:
        self.count = 0
        self.messages.clear()


_counter: _WarningCounter | None = None
_decodes = 0
_fast_decodes = 0


def init_worker() -> None:
    """Set up libvips for this worker process; call once, before the first image.

    One libvips thread, operation cache off (it would pin up to 100 input buffers),
    only the JPEG, PNG, WebP and GIF loaders allowed, and a warning counter on the
    "pyvips" logger (which then no longer propagates: a truncated image would print
    several lines each; the count and the failure detail carry the information).
    """
    global _counter
    pyvips.concurrency_set(1)
    pyvips.cache_set_max(0)
    jpegfast.init()
    pyvips.operation_block_set("VipsForeignLoad", True)
    for loader in _ALLOWED_LOADERS:
        pyvips.operation_block_set(loader, False)
    if _counter is None:
        _counter = _WarningCounter()
        logger = logging.getLogger("pyvips")
        logger.addHandler(_counter)
        logger.setLevel(logging.WARNING)  # count warnings whatever the root level is
        logger.propagate = False


def decode_count() -> int:
    """Number of full pixel decodes done by this process (one per processed image)."""
    return _decodes


def fast_decode_count() -> int:
    """How many of :func:`decode_count` went through the JPEG fast path (libjpeg-turbo)."""
    return _fast_decodes


# -- sniffing -------------------------------------------------------------------------------

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


def _sniff(body: bytes) -> str:
    """The format of ``body`` from its first bytes, or RowFailed for anything we do not load."""
    for magic, fmt in _MAGIC:
        if body.startswith(magic):
            return fmt
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    if len(body) < 12 and (any(m.startswith(body) for m, _ in _MAGIC) or b"RIFF".startswith(body[:4])):
        raise RowFailed(Reason.TRUNCATED, f"body of {len(body)} bytes ends inside the image signature")
    for magic, name in _UNSUPPORTED_MAGIC:
        if body.startswith(magic):
            raise RowFailed(Reason.UNSUPPORTED, f"{name} image")
    if body[:2] == b"BM" and body[6:10] == b"\x00\x00\x00\x00":
        raise RowFailed(Reason.UNSUPPORTED, "BMP image")
    if body[4:8] == b"ftyp" and body[8:12] in _HEIF_BRANDS:
        raise RowFailed(Reason.UNSUPPORTED, f"HEIF/AVIF image (brand {body[8:12].decode('ascii')})")
    raise RowFailed(Reason.NOT_AN_IMAGE, _describe(body))


def _describe(body: bytes) -> str:
    head = body[:512].lstrip()
    low = head.lower()
    if low.startswith((b"<!doctype html", b"<html")) or b"<body" in low:
        return "HTML page"
    if low.startswith(b"<"):
        return "XML/markup document"
    if head.startswith(b"%PDF"):
        return "PDF document"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head[:64]):
        return f"text: {head[:40].decode('ascii', 'replace')!r}"
    return f"unknown format, starts {body[:8].hex()}"


# -- colour ---------------------------------------------------------------------------------


def _icc_header(icc: bytes) -> tuple[str, str] | None:
    """(data colour space, description) of an ICC profile, or None if it is not one."""
    if len(icc) < 132 or icc[36:40] != b"acsp":
        return None
    space = icc[16:20].decode("latin-1")
    (count,) = struct.unpack_from(">I", icc, 128)
    for i in range(min(count, 256)):
        pos = 132 + 12 * i
        if pos + 12 > len(icc):
            break
        sig, off, size = struct.unpack_from(">4sII", icc, pos)
        if sig != b"desc" or off + size > len(icc):
            continue
        tag = icc[off : off + size]
        if tag[:4] == b"desc" and len(tag) >= 12:  # ICC v2 textDescriptionType: ASCII
            (n,) = struct.unpack_from(">I", tag, 8)
            return space, tag[12 : 12 + n].decode("latin-1", "replace")
        if tag[:4] == b"mluc" and len(tag) >= 28:  # ICC v4 multiLocalizedUnicode: first record
            length, start = struct.unpack_from(">II", tag, 20)
            return space, tag[start : start + length].decode("utf-16-be", "replace")
    return space, ""


_PROFILE_SPACE = {"cmyk": "CMYK", "b-w": "GRAY", "grey16": "GRAY"}


def _colour_plan(img: pyvips.Image) -> tuple[pyvips.Image, dict[str, str]]:
    """The image (minus a profile that does not fit it) and the thumbnail colour options."""
    if not img.get_typeof("icc-profile-data"):
        # No profile: RGB and gray are taken as sRGB; CMYK gets libvips' generic CMYK
        # profile from thumbnail itself.
        return img, {}
    header = _icc_header(img.get("icc-profile-data"))
    expected = _PROFILE_SPACE.get(img.interpretation, "RGB ")
    if header is None or header[0] != expected:
        img = img.copy()
        img.remove("icc-profile-data")
        return img, {}
    if img.interpretation == "cmyk":
        return img, {}  # thumbnail always imports CMYK through its profile and exports sRGB
    if expected == "RGB " and "srgb" in header[1].lower():
        return img, {}  # already sRGB: an lcms transform would cost ~7 ms for nothing
    return img, {"output_profile": "srgb"}


def _to_srgb8(img: pyvips.Image) -> pyvips.Image:
    """3/4-band 8-bit sRGB: grayscale is expanded, 16-bit is scaled down (not clipped)."""
    if img.bands < 3 or img.format != "uchar" or img.interpretation != "srgb":
        img = img.colourspace("srgb")
    if img.format != "uchar":
        img = img.cast("uchar")
    return img


# -- geometry -------------------------------------------------------------------------------


def _quarter_turns(rotation_deg: float | None) -> int:
    """Counterclockwise quarter turns for an Open Images Rotation value (None/NaN: 0)."""
    if rotation_deg is None or math.isnan(rotation_deg):
        return 0
    turns, rest = divmod(float(rotation_deg), 90.0)
    if rest:
        raise RowFailed(Reason.MALFORMED_ROW, f"Rotation {rotation_deg!r} is not a multiple of 90")
    return int(turns) % 4


def _needed_scale(v: VariantSpec, width: int, height: int) -> float:
    """Scale of the (oriented) source that this variant needs, per axis at most."""
    if v.mode in (Mode.SHRINK, Mode.PAD):
        return min(v.width / width, v.height / height, 1.0)
    return max(v.width / width, v.height / height)  # fill modes cover the box on both axes


def _thumbnail(img: pyvips.Image, mode: Mode, box: tuple[int, int], **extra: str) -> pyvips.Image:
    """Resize ``img`` into ``box`` as ``mode`` says (pad: the fit part, padding comes later)."""
    width, height = box
    if mode is Mode.FILL_CROP:
        return pyvips.Image.thumbnail_image(img, width, height=height, crop="centre", size="both", **extra)
    if mode is Mode.FILL_DISTORT:
        return pyvips.Image.thumbnail_image(img, width, height=height, size="force", **extra)
    return pyvips.Image.thumbnail_image(img, width, height=height, size="down", **extra)


# -- encoding -------------------------------------------------------------------------------


def _finish(img: pyvips.Image, v: VariantSpec, out_format: str, background: list[int]) -> pyvips.Image:
    if img.hasalpha() and out_format == "jpeg":
        img = img.flatten(background=background)
    if v.mode is Mode.PAD and (img.width, img.height) != (v.width, v.height):
        fill = background + [255] if img.hasalpha() else background
        img = img.gravity("centre", v.width, v.height, extend="background", background=fill)
    return img


def _encode(img: pyvips.Image, v: VariantSpec, out_format: str) -> bytes:
    if out_format == "jpeg":
        return img.jpegsave_buffer(
            Q=v.quality, interlace=v.progressive, subsample_mode=v.subsample, keep="none"
        )
    if out_format == "webp":
        return img.webpsave_buffer(Q=v.quality, keep="none")
    if out_format == "png":
        return img.pngsave_buffer(keep="none")
    return img.heifsave_buffer(Q=v.quality, compression="av1", keep="none")


# -- failures -------------------------------------------------------------------------------


def _failure(fmt: str, body: bytes, err: pyvips.Error, strict: bool) -> RowFailed:
    assert _counter is not None
    message = " ".join(str(err).split())
    warnings = "; ".join(_counter.messages)
    text = f"{message} {warnings}".lower()
    detail = f"{fmt}: {message}" + (f" [{warnings}]" if warnings else "")
    riff_short = fmt == "webp" and len(body) >= 8 and struct.unpack_from("<I", body, 4)[0] + 8 > len(body)
    if riff_short or any(hint in text for hint in _TRUNCATION_HINTS):
        return RowFailed(Reason.TRUNCATED, detail)
    if strict and _counter.count:
        return RowFailed(Reason.CORRUPT, f"decoder warning with strict validation: {detail}")
    return RowFailed(Reason.CORRUPT, detail)


def _load(body: bytes, fmt: str, fail_on: str, strict: bool, **options: int) -> pyvips.Image:
    try:
        return pyvips.Image.new_from_buffer(body, "", access="sequential", fail_on=fail_on, **options)
    except pyvips.Error as err:
        raise _failure(fmt, body, err, strict) from None


def _scan_after_last_eoi(body: bytes) -> bool:
    """True if a JPEG has no EOI after its last scan (SOS) marker, i.e. it is cut."""
    eoi = body.rfind(_JPEG_EOI)
    return eoi < 0 or body.find(_JPEG_SOS, eoi) >= 0


# -- the pipeline ---------------------------------------------------------------------------


def process(body: bytes | memoryview, cfg: PipelineConfig, *, rotation_deg: float | None = None) -> Processed:
    """Validate ``body`` and make every variant of ``cfg`` from a single decode.

    Raises RowFailed for every rejected image (reasons in the module docstring).
    ``rotation_deg`` is the Open Images Rotation value, used when ``cfg.apply_rotation``.
    ``body`` may be a memoryview (of the shared-memory slab): it is read, never copied,
    on the JPEG paths.
    """
    if _counter is None:
        init_worker()
    assert _counter is not None
    _counter.reset()

    if not body:
        raise RowFailed(Reason.EMPTY, "zero-byte body")
    fmt = _sniff(bytes(body[:512]))
    if fmt != "jpeg" and isinstance(body, memoryview):
        body = bytes(body)  # the byte checks below want bytes, libvips too; JPEG is the hot path
    if fmt == "png":
        if cfg.png == "discard":
            raise RowFailed(Reason.PNG_DISCARDED, "PNG body and --png discard")
        if body.rfind(_PNG_IEND) < 0:
            raise RowFailed(Reason.TRUNCATED, "png: no IEND chunk, the file is cut")
    elif fmt == "jpeg" and body[-2:] != _JPEG_EOI and _scan_after_last_eoi(bytes(body)):
        # libjpeg does not always read past the last scan's data, so a file cut just before
        # (or inside) its EOI marker can decode "fine" (~10 % of random baseline files). The
        # markers cannot occur inside entropy-coded data (0xFF is always stuffed there).
        raise RowFailed(Reason.TRUNCATED, "jpeg: no EOI marker after the last scan, the file is cut")
    turns = _quarter_turns(rotation_deg) if cfg.apply_rotation else 0
    if fmt == "jpeg" and cfg.jpeg_fast_path:
        fast = _fast_jpeg(body, cfg, turns)
        if fast is not None:
            return Processed(fast[0], fast[1], fmt, fast[2], 0)
    if isinstance(body, memoryview):
        body = bytes(body)  # libvips' loader lookup takes bytes only
    try:
        width, height, outputs = _decode(body, fmt, cfg, turns)
    except pyvips.Error as err:
        raise _failure(fmt, body, err, cfg.strict) from None
    # Read the count only now: libjpeg warnings are logged when the loader is freed, and
    # every image of this body was freed when _decode returned.
    return Processed(width, height, fmt, outputs, _counter.count)


def _check_pixels(width: int, height: int, cfg: PipelineConfig) -> None:
    if width * height > cfg.max_pixels:
        raise RowFailed(
            Reason.TOO_MANY_PIXELS, f"{width}x{height} = {width * height} px is over the cap of {cfg.max_pixels}"
        )


def _decode(body: bytes, fmt: str, cfg: PipelineConfig, turns: int) -> tuple[int, int, tuple[Encoded, ...]]:
    """(oriented source width, height, outputs): the header check, then the one decode."""
    global _decodes
    fail_on = "warning" if cfg.strict else "error"
    img = _load(body, fmt, fail_on, cfg.strict)  # header only
    src_w, src_h = img.width, img.height
    _check_pixels(src_w, src_h, cfg)
    orientation = img.get("orientation") if img.get_typeof("orientation") else 1
    swap = (orientation in (5, 6, 7, 8)) != (turns % 2 == 1)
    out_w, out_h = (src_h, src_w) if swap else (src_w, src_h)
    if cfg.variants:
        return out_w, out_h, _make_variants(body, img, fmt, cfg, turns, fail_on, (out_w, out_h))
    if fmt == "jpeg":  # 1/8-scale IDCT: every scan is still entropy-decoded, at a fraction of the cost
        img = _load(body, fmt, fail_on, cfg.strict, shrink=8)
    _decodes += 1
    img.avg()
    return out_w, out_h, ()


def _make_variants(
    body: bytes,
    img: pyvips.Image,
    fmt: str,
    cfg: PipelineConfig,
    turns: int,
    fail_on: str,
    oriented: tuple[int, int],
) -> tuple[Encoded, ...]:
    out_w, out_h = oriented
    needs = [_needed_scale(v, out_w, out_h) for v in cfg.variants]
    base_scale = min(max(needs), 1.0)
    base_box = (max(1, math.ceil(out_w * base_scale)), max(1, math.ceil(out_h * base_scale)))

    if fmt == "jpeg":
        # Shrink-on-load: the DCT decodes at 1/2, 1/4 or 1/8 scale for a fraction of the
        # cost. Take the largest factor that still leaves at least the base size (thumbnail
        # itself keeps a 2x margin; measured ~20 % faster on 4000x3000 -> 1024 this way).
        src_w, src_h = img.width, img.height
        need_w, need_h = math.ceil(src_w * base_scale), math.ceil(src_h * base_scale)
        shrink = next((k for k in _JPEG_SHRINKS if src_w / k >= need_w and src_h / k >= need_h), 1)
        if shrink > 1:
            img = _load(body, fmt, fail_on, cfg.strict, shrink=shrink)

    img, colour = _colour_plan(img)
    background = list(cfg.background_rgb)
    out_format = {v.name: "png" if fmt == "png" and cfg.png == "keep" else v.format for v in cfg.variants}

    def first_stage(mode: Mode, box: tuple[int, int]) -> pyvips.Image:
        """Decode, colour-manage, orient: the one pass over the source pixels."""
        global _decodes
        if turns % 2:  # thumbnail works before the Rotation turn: give it the turned box
            box = (box[1], box[0])
        out = _thumbnail(img, mode, box, **colour)
        if turns:
            out = out.rot(_ROT_FOR_TURNS[turns])
        _decodes += 1
        # Materialise here so decode errors surface here (and only here), not in an encoder.
        out = _to_srgb8(out).copy_memory()
        if fmt == "gif" and out.hasalpha() and out[out.bands - 1].min() == 255:
            # libvips' GIF loader always adds an alpha band: an opaque GIF must not give
            # 4-band PNG/AVIF outputs (a cheap check: this image is already in memory).
            out = out.extract_band(0, n=out.bands - 1)
        return out

    if len(cfg.variants) == 1:
        v = cfg.variants[0]
        out = _finish(first_stage(v.mode, (v.width, v.height)), v, out_format[v.name], background)
        data = _encode(out, v, out_format[v.name])
        return (Encoded(v.name, _EXTENSIONS[out_format[v.name]], data, out.width, out.height),)

    base = first_stage(Mode.SHRINK, base_box)
    # Full (uncropped, unpadded) views to resize from, smallest last: the base, then every
    # shrink/pad result. Each variant is made from the smallest view that still has its
    # resolution, so 1024 -> 512 -> 256 cascades instead of reading the base three times.
    views: list[pyvips.Image] = [base]
    order = sorted(range(len(cfg.variants)), key=lambda i: needs[i], reverse=True)
    results: dict[int, Encoded] = {}
    for rank, i in enumerate(order):
        v = cfg.variants[i]
        min_w, min_h = out_w * needs[i] - 0.5, out_h * needs[i] - 0.5
        source = next(
            (view for view in reversed(views) if view.width >= min_w and view.height >= min_h),
            base,
        )
        fits = min(v.width / source.width, v.height / source.height) >= 1
        if fits and v.mode in (Mode.SHRINK, Mode.PAD) or (source.width, source.height) == (v.width, v.height):
            resized = source  # already this variant's size: typically the largest variant is the base
        else:
            resized = _thumbnail(source, v.mode, (v.width, v.height))
            if v.mode in (Mode.SHRINK, Mode.PAD) and rank + 1 < len(order):
                resized = resized.copy_memory()  # read again by the next, smaller variants
                views.append(resized)
        out = _finish(resized, v, out_format[v.name], background)
        data = _encode(out, v, out_format[v.name])
        results[i] = Encoded(v.name, _EXTENSIONS[out_format[v.name]], data, out.width, out.height)
    return tuple(results[i] for i in range(len(cfg.variants)))



# -- the JPEG fast path ---------------------------------------------------------------------


def _fast_profile_ok(info: jpegfast.JpegInfo) -> bool:
    """True if the pyvips path would not colour-manage this JPEG (same rules as _colour_plan)."""
    if info.icc is None:
        return True
    header = _icc_header(info.icc)
    expected = "GRAY" if info.gray else "RGB "
    if header is None or header[0] != expected:
        return True  # a profile that does not fit the pixels is ignored
    return expected == "RGB " and "srgb" in header[1].lower()


def _resize_box(mode: Mode, box: tuple[int, int], src: tuple[int, int]) -> tuple[int, int]:
    """The size libvips' ``thumbnail`` resizes ``src`` to for ``mode`` (before crop or pad).

    Same arithmetic as ``vips_thumbnail_calculate_shrink`` and ``vips_resize``: one shrink
    factor for both axes (the one that fits, or for fill-crop the one that covers), never
    below 1 for shrink/pad, never more than an axis has pixels; sizes rounded half up.
    """
    (bw, bh), (w, h) = box, src
    if mode is Mode.FILL_DISTORT:
        return bw, bh
    hshrink, vshrink = w / bw, h / bh
    shrink = min(hshrink, vshrink) if mode is Mode.FILL_CROP else max(hshrink, vshrink, 1.0)
    return max(1, int(w / min(shrink, w) + 0.5)), max(1, int(h / min(shrink, h) + 0.5))


def _fast_jpeg(body: bytes | memoryview, cfg: PipelineConfig, turns: int) -> tuple[int, int, tuple[Encoded, ...]] | None:
    """The JPEG fast path (:mod:`engine.jpegfast`), or None to leave the body to pyvips.

    Taken for 8-bit YCbCr or grayscale JPEGs, baseline or progressive, with no ICC profile
    or an sRGB one (what the pyvips path would not colour-manage), that libjpeg-turbo
    decodes without a single warning. Everything else, including every truncated or
    damaged file, returns None before any output is made, so the pyvips path gives the
    validation policy's verdict and warning count exactly as before.
    """
    global _decodes, _fast_decodes
    info = jpegfast.read_header(body)
    if info is None or not _fast_profile_ok(info):
        return None
    _check_pixels(info.width, info.height, cfg)
    swap = (info.orientation in (5, 6, 7, 8)) != (turns % 2 == 1)
    out_w, out_h = (info.height, info.width) if swap else (info.width, info.height)
    if not cfg.variants:
        if jpegfast.decode(body, 1, 1) is None:  # 1/8 scale: every scan is still entropy-decoded
            return None
        _decodes += 1
        _fast_decodes += 1
        return out_w, out_h, ()
    needs = [_needed_scale(v, out_w, out_h) for v in cfg.variants]
    base_scale = min(max(needs), 1.0)
    min_w, min_h = math.ceil(info.width * base_scale), math.ceil(info.height * base_scale)
    if min_w * min_h > _FAST_MAX_DECODED_PX:
        return None
    pixels = jpegfast.decode(body, min_w, min_h)
    if pixels is None:
        return None
    _decodes += 1
    _fast_decodes += 1
    base = jpegfast.orient(pixels, info.orientation, turns)
    del pixels
    # Resize targets come from the source size, as libvips computes them, not from the
    # DCT-scaled size: both paths give the same output sizes. Each variant is made from the
    # smallest shrink result so far that still has its resolution (1024 -> 512 -> 256).
    views = [base]
    order = sorted(range(len(cfg.variants)), key=lambda i: needs[i], reverse=True)
    results: dict[int, Encoded] = {}
    for i in order:
        v = cfg.variants[i]
        rw, rh = _resize_box(v.mode, (v.width, v.height), (out_w, out_h))
        source = next((view for view in reversed(views) if view.shape[1] >= rw and view.shape[0] >= rh), base)
        resized = jpegfast.resize(source, rw, rh)
        if v.mode in (Mode.SHRINK, Mode.PAD):
            views.append(resized)
        if v.mode is Mode.FILL_CROP:
            resized = jpegfast.crop_centre(resized, v.width, v.height)
        elif v.mode is Mode.PAD:
            resized = jpegfast.pad_centre(resized, v.width, v.height, cfg.background_rgb)
        height, width = resized.shape[:2]
        if v.format == "jpeg" and not v.progressive:
            data = jpegfast.encode_jpeg(resized, v.quality, v.subsample)
        else:  # libjpeg-turbo via simplejpeg writes baseline only; webp/png/avif are libvips' encoders
            img = pyvips.Image.new_from_memory(resized.data, width, height, 3, "uchar").copy(interpretation="srgb")
            data = _encode(img, v, v.format)
        results[i] = Encoded(v.name, _EXTENSIONS[v.format], data, width, height)
    return out_w, out_h, tuple(results[i] for i in range(len(cfg.variants)))
