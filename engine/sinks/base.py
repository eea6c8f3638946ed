"""What every output format shares: the sample handed to a sink, and the shard-writer interface.

A *sample* is one image of one variant with everything known about it: the encoded bytes
(still in the slab: chunks are streamed, not copied, where the format allows), the output
and source sizes, the list row, and the annotations. A *shard writer* appends samples to one
file under its temporary name and reports where each landed; :mod:`engine.sinks.shards`
decides when to cut, and makes a finished shard appear atomically with its rows committed.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .annotations import ImageAnnotations

#: output formats of ``run --format``; every one except ``files`` is sharded
FORMATS = ("files", "webdataset", "tfrecord", "parquet")
#: file extension of a shard of each sharded format
SHARD_EXT = {"webdataset": "tar", "tfrecord": "tfrecord", "parquet": "parquet"}
#: image format name of each output extension (the names TF's decoders and PIL use)
EXT_FORMAT = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "gif": "gif", "avif": "avif",
              "heic": "heif", "tif": "tiff", "bin": "bin"}


@dataclass
class Sample:
    """One image of one variant, ready for a sink."""

    image_id: str
    variant: str
    ext: str  # jpg, webp, png... (the variant's, or an original's sniffed format)
    chunks: Sequence[bytes | memoryview]  # the encoded image, in order
    nbytes: int
    width: int
    height: int
    #: JSON-ready description: list row, source size, rotation, annotations (see :func:`document`)
    doc: dict[str, Any] = field(default_factory=dict)
    annotations: ImageAnnotations | None = None

    @property
    def format(self) -> str:
        return EXT_FORMAT.get(self.ext, self.ext)

    def data(self) -> bytes:
        """The image as one bytes object (formats that must hold it whole: protobuf, Arrow)."""
        if len(self.chunks) == 1 and isinstance(self.chunks[0], bytes):
            return self.chunks[0]
        return b"".join(self.chunks)


def document(
    image_id: str,
    *,
    variant: str,
    width: int,
    height: int,
    image_format: str,
    source_width: int | None,
    source_height: int | None,
    source_format: str | None,
    rotation: float | None,
    rotation_applied: bool,
    url: str | None,
    md5: str | None,
    list_row: dict[str, str],
    annotations: ImageAnnotations | None,
) -> dict[str, Any]:
    """The per-sample JSON (webdataset ``<id>.json``, files ``<id>.json``, parquet columns).

    ``rotation`` is the list's ``Rotation``; with ``rotation_applied`` false the pixels are not
    turned by it, while the annotations (normalised to the rotated image) are as stored.
    """
    doc: dict[str, Any] = {
        "image_id": image_id,
        "variant": variant,
        "format": image_format,
        "width": width,
        "height": height,
        "source_width": source_width,
        "source_height": source_height,
        "source_format": source_format,
        "rotation": rotation,
        "rotation_applied": rotation_applied,
        "url": url,
        "md5": md5,
        "list": list_row,
    }
    if annotations is not None:
        doc["annotations"] = annotations.to_json()
    return doc


class ShardWriter(ABC):
    """Appends samples to one shard file under its temporary name; memory stays per sample."""

    #: the format's name in ``--format``
    format_name: str = ""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self.samples = 0
        #: bytes written to the file so far (what --shard-bytes counts)
        self.nbytes = 0

    @abstractmethod
    def add(self, s: Sample) -> int:
        """Append one sample; returns its offset (tar: image data byte offset, TFRecord: record
        byte offset, parquet: row number) for the state DB's ``outputs.shard_offset``."""

    @abstractmethod
    def finish(self) -> None:
        """Complete the file (trailers, footers) and, when durable, fsync it. It stays at ``path``."""

    @abstractmethod
    def abort(self) -> None:
        """Close without completing (the caller deletes the file)."""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry, not just the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RawFile:
    """Appends with an exact byte count: large pieces (image data straight from slab memoryviews)
    are written as they are, small ones (headers, JSON) gathered so a sample costs few syscalls."""

    _SMALL = 64 * 1024
    _FLUSH = 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.pos = 0
        self.buf = bytearray()

    def _put(self, view: memoryview) -> None:
        while view:
            k = os.write(self.fd, view)
            view = view[k:]

    def flush(self) -> None:
        if self.buf:
            self._put(memoryview(self.buf))
            self.buf = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        if n < self._SMALL:
            self.buf += data
            if len(self.buf) >= self._FLUSH:
                self.flush()
        else:
            self.flush()
            self._put(memoryview(data))
        self.pos += n
        return n

    def close(self, fsync: bool) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
            if fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
