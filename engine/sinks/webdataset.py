"""webdataset shards: plain POSIX tar files, one sample per image, key = ImageID.

Members of a sample, in this order (webdataset groups consecutive members by the part of the
name before the first dot, and ImageIDs have no dots):

- ``<ImageID>.<ext>`` the image (jpg, webp, png per the variant's format);
- ``<ImageID>.json`` list row, source and output sizes, rotation, annotations;
- ``<ImageID>.mask_<n>.png`` the mask of the n-th segmentation in the JSON, when present.

Headers are written by :mod:`tarfile` (PAX, so a 128-character ImageID is fine); the image
data is streamed from the slab without a copy. The archive ends with the two zero blocks and
is padded to tar's 10 KiB record, as ``tar`` itself writes it.
"""

from __future__ import annotations

import json
import tarfile
import time

from .base import RawFile, Sample, ShardWriter

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def _header(name: str, size: int, mtime: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = mtime
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class TarShard(ShardWriter):
    format_name = "webdataset"

    def __init__(self, path, durable: bool = True) -> None:  # noqa: ANN001
        super().__init__(path, durable)
        self.f = RawFile(path)
        self.mtime = int(time.time())

    def _member(self, name: str, chunks, size: int) -> int:  # noqa: ANN001
        """Write one member; returns the byte offset of its data."""
        self.f.write(_header(name, size, self.mtime))
        at = self.f.pos
        for c in chunks:
            self.f.write(c)
        pad = -size % _BLOCK
        if pad:
            self.f.write(b"\0" * pad)
        return at

    def add(self, s: Sample) -> int:
        key = s.image_id
        at = self._member(f"{key}.{s.ext}", s.chunks, s.nbytes)
        doc = json.dumps(s.doc, separators=(",", ":"), ensure_ascii=False).encode()
        self._member(f"{key}.json", (doc,), len(doc))
        if s.annotations is not None:
            for n, mask in enumerate(s.annotations.masks):
                if mask is not None:
                    self._member(f"{key}.mask_{n}.png", (mask,), len(mask))
        self.samples += 1
        self.nbytes = self.f.pos
        return at

    def finish(self) -> None:
        end = self.f.pos + 2 * _BLOCK
        self.f.write(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
        self.nbytes = self.f.pos
        self.f.close(self.durable)

    def abort(self) -> None:
        self.f.close(False)
