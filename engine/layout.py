"""Where files go under ``--out``: ``<variant>/<first 3 chars of ImageID>/<ImageID>.<ext>``.

The ImageID comes from an untrusted list, so it is checked here, at the one place where it
becomes part of a path, whatever the caller checked before.
"""

from __future__ import annotations

import re

ORIGINAL = "original"
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

#: file extension for each format the pipeline can report
FORMAT_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "avif": "avif", "heif": "heic", "tiff": "tif"}


def validate_variant(variant: str) -> None:
    if not _SAFE_PART.fullmatch(variant) or variant in (".", "..") or variant.startswith("."):
        raise ValueError(f"unsafe variant name {variant!r}")


def rel_path(variant: str, image_id: str, ext: str, subdirs: bool = True) -> str:
    if not _SAFE.fullmatch(image_id):
        raise ValueError(f"unsafe ImageID {image_id!r}")
    validate_variant(variant)
    if not ext.isalnum():
        raise ValueError(f"unsafe extension {ext!r}")
    name = f"{image_id}.{ext}"
    if subdirs:
        return f"{variant}/{image_id[:3]}/{name}"
    return f"{variant}/{name}"
