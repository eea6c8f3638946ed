"""Output variants: what to make from each image, parsed from ``--variant`` / ``--sizes``.

A variant is a box, a resize mode, an output format and its encoder settings. Every
variant of an image is made from a single decode (see :mod:`engine.images`).

Spec grammar (``--variant``)::

    SIZE[:MODE][:FORMAT][:qN][:progressive][:subsample=on|off]

    SIZE    N (an N x N box) or WxH, 1..16383 px each
    MODE    shrink (default) | fill-crop | fill-distort | pad
    FORMAT  jpeg (default; alias jpg) | webp | png | avif (when the bundled libvips can encode it)
    qN      quality 1..100 (default --quality, itself 90 by default); not for png, which is lossless
    progressive          progressive JPEG (jpeg only)
    subsample=on|off     force 4:2:0 chroma subsampling on or off (jpeg only; the default, auto,
                         lets libvips subsample below q90 only)

The parts after SIZE may come in any order, each at most once. ``--sizes 256,512`` is
shorthand for ``--variant 256 --variant 512``.

Modes (the box is W x H):

==============  =====================================================================
shrink          fit inside the box keeping the aspect ratio; never upscales, so a small
                image keeps its size (dnuffer's ShrinkToFit)
fill-crop       scale to cover the box, then crop the centre: exactly W x H; upscales a
                source smaller than the box (a training input needs its exact size)
fill-distort    scale each axis to the box, ignoring the aspect ratio: exactly W x H;
                upscales like fill-crop
pad             fit inside the box like shrink (never upscales), then pad to exactly
                W x H with the background colour, image centred
==============  =====================================================================
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

#: Largest box side. 16383 is the WebP limit, the smallest of our encoders' limits.
MAX_SIDE_PX = 16383
DEFAULT_QUALITY = 90

_FORMATS: dict[str, str] = {"jpeg": "jpeg", "jpg": "jpeg", "webp": "webp", "png": "png", "avif": "avif"}
_EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "webp": "webp", "png": "png", "avif": "avif"}
_SIZE_RE = re.compile(r"^(\d+)(?:x(\d+))?$")
_QUALITY_RE = re.compile(r"^q(\d+)$")
_SUBSAMPLE_RE = re.compile(r"^subsample=(on|off|auto)$")


class Mode(str, enum.Enum):
    SHRINK = "shrink"
    FILL_CROP = "fill-crop"
    FILL_DISTORT = "fill-distort"
    PAD = "pad"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VariantSpec:
    width: int  # box width in px
    height: int  # box height in px ("256" means a 256x256 box: longest side 256 for shrink)
    mode: Mode = Mode.SHRINK
    format: str = "jpeg"  # jpeg | webp | png | avif
    quality: int = DEFAULT_QUALITY
    progressive: bool = False  # jpeg only
    subsample: str = "auto"  # jpeg chroma subsampling: auto | on | off

    def __post_init__(self) -> None:
        for side in (self.width, self.height):
            if not 1 <= side <= MAX_SIDE_PX:
                raise ValueError(f"variant box side {side} is out of range 1..{MAX_SIDE_PX}")
        if self.format not in _EXTENSIONS:
            raise ValueError(f"unknown variant format {self.format!r}; expected one of {', '.join(_EXTENSIONS)}")
        if not isinstance(self.mode, Mode):
            modes = ", ".join(m.value for m in Mode)
            if self.mode not in (m.value for m in Mode):
                raise ValueError(f"unknown variant mode {self.mode!r}; expected one of {modes}")
            object.__setattr__(self, "mode", Mode(self.mode))  # accept the plain string too
        if not 1 <= self.quality <= 100:
            raise ValueError(f"variant quality {self.quality} is out of range 1..100")
        if self.subsample not in ("auto", "on", "off"):
            raise ValueError(f"variant subsample {self.subsample!r} must be auto, on or off")
        if self.format != "jpeg" and (self.progressive or self.subsample != "auto"):
            raise ValueError("progressive and subsample= apply to jpeg variants only")

    @property
    def name(self) -> str:
        """Directory name under ``--out`` and the ``outputs.variant`` DB value.

        Rule: the box (``N`` when square, else ``WxH``), then, each only when it differs
        from the default, ``-MODE``, ``-FORMAT``, ``-qN`` (never for png), ``-progressive``,
        ``-subsample-on|off``; joined with ``-``. So the default spec of ``256`` is plain
        ``256``; ``512:fill-crop:webp:q80`` is ``512-fill-crop-webp-q80``;
        ``224x224:fill-distort`` is ``224-fill-distort`` (same box as ``224``);
        ``640x480:pad:q75:progressive`` is ``640x480-pad-q75-progressive``. Names use only
        ``[0-9a-z-]`` and two specs that make the same files have the same name.
        """
        parts = [str(self.width) if self.width == self.height else f"{self.width}x{self.height}"]
        if self.mode is not Mode.SHRINK:
            parts.append(self.mode.value)
        if self.format != "jpeg":
            parts.append(self.format)
        if self.quality != DEFAULT_QUALITY and self.format != "png":
            parts.append(f"q{self.quality}")
        if self.progressive:
            parts.append("progressive")
        if self.subsample != "auto":
            parts.append(f"subsample-{self.subsample}")
        return "-".join(parts)

    @property
    def ext(self) -> str:
        """File extension without the dot: jpg, webp, png or avif."""
        return _EXTENSIONS[self.format]


@functools.cache
def avif_supported() -> bool:
    """Whether the bundled libvips can encode AVIF (libheif with an AV1 encoder)."""
    import pyvips  # imported here: only an avif spec needs libvips in the parsing process

    try:
        pyvips.Image.black(8, 8, bands=3).heifsave_buffer(compression="av1", Q=50)
    except pyvips.Error:
        return False
    return True


def parse_variant(spec: str, *, default_quality: int = DEFAULT_QUALITY) -> VariantSpec:
    """Parse one ``--variant`` spec (grammar in the module docstring).

    Raises ValueError with a message naming the spec and the bad part.
    """
    text = spec.strip().lower()
    parts = text.split(":")

    def bad(why: str) -> ValueError:
        return ValueError(f"bad variant {spec!r}: {why}")

    m = _SIZE_RE.match(parts[0])
    if not m:
        raise bad(f"size {parts[0]!r} must be N or WxH (e.g. 256 or 640x480)")
    width = int(m.group(1))
    height = int(m.group(2)) if m.group(2) else width
    for side in (width, height):
        if not 1 <= side <= MAX_SIDE_PX:
            raise bad(f"size {side} is out of range 1..{MAX_SIDE_PX}")

    mode: Mode | None = None
    fmt: str | None = None
    quality: int | None = None
    progressive = False
    subsample: str | None = None
    for part in parts[1:]:
        if part in (m_.value for m_ in Mode):
            if mode is not None:
                raise bad("more than one mode")
            mode = Mode(part)
        elif part in _FORMATS:
            if fmt is not None:
                raise bad("more than one format")
            fmt = _FORMATS[part]
        elif (qm := _QUALITY_RE.match(part)) is not None:
            if quality is not None:
                raise bad("more than one quality")
            quality = int(qm.group(1))
            if not 1 <= quality <= 100:
                raise bad(f"quality q{quality} is out of range q1..q100")
        elif part == "progressive":
            if progressive:
                raise bad("progressive given twice")
            progressive = True
        elif (sm := _SUBSAMPLE_RE.match(part)) is not None:
            if subsample is not None:
                raise bad("more than one subsample=")
            subsample = sm.group(1)
        else:
            raise bad(
                f"unknown part {part!r}; expected a mode ({', '.join(m_.value for m_ in Mode)}), "
                f"a format (jpeg, webp, png, avif), qN (1..100), progressive or subsample=on|off"
            )

    fmt = fmt or "jpeg"
    if fmt != "jpeg" and (progressive or subsample is not None):
        raise bad("progressive and subsample= apply to jpeg only")
    if fmt == "png" and quality is not None:
        raise bad("png is lossless: qN does not apply")
    if fmt == "avif" and not avif_supported():
        raise bad("this libvips build cannot encode AVIF")
    if not 1 <= default_quality <= 100:
        raise ValueError(f"default quality {default_quality} is out of range 1..100")
    return VariantSpec(
        width=width,
        height=height,
        mode=mode or Mode.SHRINK,
        format=fmt,
        # png ignores quality; keep the default so equal outputs compare equal
        quality=quality if quality is not None else (DEFAULT_QUALITY if fmt == "png" else default_quality),
        progressive=progressive,
        subsample=subsample or "auto",
    )


def parse_sizes(text: str, *, default_quality: int = DEFAULT_QUALITY) -> tuple[VariantSpec, ...]:
    """Parse the ``--sizes`` shorthand: comma-separated specs, e.g. ``256,512``; ``""`` gives ()."""
    if not text.strip():
        return ()
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise ValueError(f"bad sizes {text!r}: empty item between commas")
    return tuple(parse_variant(item, default_quality=default_quality) for item in items)


PNG_POLICIES = ("convert", "keep", "discard")


@dataclass(frozen=True)
class PipelineConfig:
    """What the image pipeline does with each body (see :func:`engine.images.process`)."""

    variants: tuple[VariantSpec, ...] = ()
    max_pixels: int = 100_000_000  # width x height from the header; above it: too_many_pixels
    png: str = "convert"  # convert | keep | discard
    background_rgb: tuple[int, int, int] = (255, 255, 255)  # alpha flattening and pad colour
    apply_rotation: bool = False  # apply the Open Images `Rotation` column
    # Reject as `corrupt` any image the decoder warns about (e.g. libjpeg "Corrupt JPEG
    # data"), instead of accepting it and counting the warnings.
    strict: bool = False
    # Decode, resize and encode plain 8-bit YCbCr/gray JPEGs with libjpeg-turbo and OpenCV
    # (engine.jpegfast), about twice as fast as libvips; False sends every image to pyvips.
    jpeg_fast_path: bool = True

    def __post_init__(self) -> None:
        if self.png not in PNG_POLICIES:
            raise ValueError(f"png policy {self.png!r} must be one of {', '.join(PNG_POLICIES)}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if len(self.background_rgb) != 3 or not all(0 <= c <= 255 for c in self.background_rgb):
            raise ValueError(f"background_rgb must be three values 0..255, got {self.background_rgb!r}")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variants given twice: {', '.join(dupes)}")


def spec_from_name(name: str) -> VariantSpec:
    """The spec behind a variant directory name (the inverse of :attr:`VariantSpec.name`).

    ``export`` reads the variant's mode back from the ``outputs.variant`` names the state DB
    holds. Raises ValueError for a name no spec produces.
    """
    tokens = name.split("-")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        pair = "-".join(tokens[i : i + 2])
        if pair in (Mode.FILL_CROP.value, Mode.FILL_DISTORT.value):
            parts.append(pair)
            i += 2
        elif tokens[i] == "subsample" and i + 1 < len(tokens):
            parts.append(f"subsample={tokens[i + 1]}")
            i += 2
        else:
            parts.append(tokens[i])
            i += 1
    spec = parse_variant(":".join(parts)) if parts and parts[0] else None
    if spec is None or spec.name != name:
        raise ValueError(f"{name!r} is not a variant name")
    return spec
