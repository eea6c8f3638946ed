"""The JPEG fast path's building blocks: libjpeg-turbo decode and encode, OpenCV resize.

libvips' own JPEG load and save cost about twice what libjpeg-turbo costs when called
directly, plus ~3 ms of fixed cost per image job (measured on 64-px JPEGs, where pixels
cost nothing), so for the common case :mod:`engine.images` decodes with libjpeg-turbo
(simplejpeg) at the smallest DCT scale (M/8, M = 1..8) that serves every variant, resizes
the pixels with OpenCV's area filter and encodes JPEG outputs with libjpeg-turbo again.

Only what the fast path can do exactly as the pyvips path would is taken: a baseline,
extended or progressive Huffman JPEG with 8-bit samples, YCbCr or grayscale (as libjpeg
sees it: no CMYK/YCCK, no Adobe RGB-transform files), whose structure up to the first
scan parses. :func:`read_header` says whether a body qualifies; :func:`decode` returns
None whenever libjpeg-turbo rejects a file or so much as warns about it (strict mode), so
every truncated, corrupt or merely damaged file is left to the pyvips path, which sorts
it into the validation policy's reasons and counts its warnings. Nothing here decides an
outcome.

simplejpeg returns neither EXIF nor ICC data, so the marker segments before the first
scan are read here: the EXIF orientation (APP1) and the ICC profile (APP2 chunks).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

_SOF_FAST = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field
_MAX_SEGMENTS = 512  # a real header has a dozen; bounds the walk over hostile bytes
_ICC_TAG = b"ICC_PROFILE\x00"


def init() -> None:
    """One OpenCV thread: a worker process handles one image at a time (like libvips)."""
    cv2.setNumThreads(1)


@dataclass(frozen=True)
class JpegInfo:
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int  # EXIF orientation 1..8 (1 when absent or out of range)
    icc: bytes | None  # the embedded ICC profile, chunks joined, or None
    gray: bool


def read_header(body: bytes | memoryview) -> JpegInfo | None:
    """The header of a JPEG the fast path can take, or None (then the pyvips path decides)."""
    try:
        segments = _segments(body)
    except (IndexError, struct.error):
        return None
    if segments is None:
        return None
    sof, precision, width, height, orientation, icc = segments
    if sof not in _SOF_FAST or precision != 8 or width == 0 or height == 0:
        return None
    try:
        _, _, colourspace, _ = simplejpeg.decode_jpeg_header(body)
    except Exception:  # noqa: BLE001 - anything libjpeg-turbo dislikes goes to pyvips
        return None
    if colourspace not in ("YCbCr", "Gray"):
        return None
    return JpegInfo(width, height, orientation, icc, colourspace == "Gray")


def _segments(body: bytes | memoryview) -> tuple[int, int, int, int, int, bytes | None] | None:
    """(SOF marker, precision, width, height, orientation, ICC) from the segments before SOS."""
    n = len(body)
    pos = 2
    sof = precision = width = height = 0
    orientation = 1
    icc_chunks: dict[int, bytes] = {}
    exif_seen = False
    for _ in range(_MAX_SEGMENTS):
        if pos + 4 > n or body[pos] != 0xFF:
            return None
        while body[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
            if pos + 4 > n:
                return None
        marker = body[pos + 1]
        pos += 2
        if marker in _STANDALONE:
            continue
        (length,) = struct.unpack_from(">H", body, pos)
        end = pos + length
        if length < 2 or end > n:
            return None
        if marker == 0xDA:  # SOS: the entropy-coded data begins
            if not sof:
                return None
            icc = b"".join(icc_chunks[k] for k in sorted(icc_chunks)) if icc_chunks else None
            return sof, precision, width, height, orientation, icc
        if marker in _SOF_ALL:
            if sof:
                return None  # two frames: leave it to libvips
            sof = marker
            precision, height, width = struct.unpack_from(">BHH", body, pos + 2)
        elif marker == 0xE1 and not exif_seen and bytes(body[pos + 2 : pos + 8]) == b"Exif\x00\x00":
            exif_seen = True  # libexif reads the first EXIF block only
            orientation = _exif_orientation(bytes(body[pos + 8 : end]))
        elif marker == 0xE2 and bytes(body[pos + 2 : pos + 14]) == _ICC_TAG and length >= 16:
            icc_chunks[body[pos + 14]] = bytes(body[pos + 16 : end])
        pos = end
    return None


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 if absent or bad."""
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
        (count,) = struct.unpack_from(endian + "H", tiff, ifd)
        for i in range(min(count, 1024)):
            tag, kind = struct.unpack_from(endian + "HH", tiff, ifd + 2 + 12 * i)
            if tag != 0x0112:
                continue
            if kind == 3:  # SHORT
                (value,) = struct.unpack_from(endian + "H", tiff, ifd + 2 + 12 * i + 8)
            elif kind == 4:  # LONG
                (value,) = struct.unpack_from(endian + "I", tiff, ifd + 2 + 12 * i + 8)
            else:
                return 1
            return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        return 1
    return 1


def decode(body: bytes | memoryview, min_width: int, min_height: int) -> np.ndarray | None:
    """RGB pixels at the smallest DCT scale (M/8) that is at least ``min_width`` x ``min_height``.

    None if libjpeg-turbo fails or warns (truncated, corrupt, "Corrupt JPEG data"...): the
    caller then leaves the body to the pyvips path, which gives the policy's verdict. A
    grayscale JPEG comes out as 3 equal bands (libjpeg's own gray -> RGB expansion).
    """
    try:
        return simplejpeg.decode_jpeg(
            body, "RGB", fastdct=False, fastupsample=False, min_width=min_width, min_height=min_height, strict=True
        )
    except (ValueError, RuntimeError):
        return None


# Array operations that show the stored image as EXIF orientation N says it should be seen.
# Each is a view (no copy); the caller makes the result contiguous once.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # 90 degrees clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # 90 degrees counterclockwise
}


def orient(pixels: np.ndarray, orientation: int, ccw_turns: int) -> np.ndarray:
    """Apply the EXIF orientation, then ``ccw_turns`` quarter turns counterclockwise."""
    out = _ORIENT[orientation](pixels) if orientation in _ORIENT else pixels
    if ccw_turns:
        out = np.rot90(out, ccw_turns)
    return np.ascontiguousarray(out)


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resample to exactly ``width`` x ``height``.

    Downscaling uses OpenCV's area filter: every source pixel contributes with its exact
    overlap, so there is no aliasing at any ratio; upscaling (fill modes on a small source)
    uses bicubic interpolation.
    """
    h, w = pixels.shape[:2]
    if (w, h) == (width, height):
        return pixels
    up = width > w and height > h
    return cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA)


def crop_centre(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The centre ``width`` x ``height`` (libvips' ``crop=centre`` offsets: floor of half the excess)."""
    h, w = pixels.shape[:2]
    left, top = (w - width) // 2, (h - height) // 2
    return np.ascontiguousarray(pixels[top : top + height, left : left + width])


def pad_centre(pixels: np.ndarray, width: int, height: int, background: tuple[int, int, int]) -> np.ndarray:
    """``pixels`` centred on a ``width`` x ``height`` canvas of ``background`` (libvips ``gravity centre``)."""
    h, w = pixels.shape[:2]
    if (w, h) == (width, height):
        return pixels
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = background
    left, top = (width - w) // 2, (height - h) // 2
    canvas[top : top + h, left : left + w] = pixels
    return canvas


def encode_jpeg(pixels: np.ndarray, quality: int, subsample: str) -> bytes:
    """Baseline JPEG with libjpeg-turbo; ``subsample`` as libvips' ``subsample_mode``.

    ``auto`` subsamples chroma (4:2:0) below quality 90 only, as libvips does; the accurate
    integer DCT (libvips' default too). No EXIF, no ICC: plain sRGB JFIF.
    """
    chroma = "420" if subsample == "on" or (subsample == "auto" and quality < 90) else "444"
    return simplejpeg.encode_jpeg(pixels, quality, "RGB", chroma, fastdct=False)
