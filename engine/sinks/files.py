"""``--format files``: one file per image and variant, ``OUT/<variant>/<abc>/<ImageID>.<ext>``.

Each file is written under ``OUT/.oidl-tmp/`` and renamed into place before its row is
committed. With ``--annotations`` the sample's JSON (list row, sizes, rotation, annotations;
masks as base64 PNG in ``segmentations[n].mask_png``) goes beside the image as ``<ImageID>.json``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from ..layout import rel_path
from ..state import OutputRow
from .base import RawFile, Sample


class FilesSink:
    def __init__(self, out_dir: Path, tmp_dir: Path, *, subdirs: bool, durable: bool, sidecars: bool) -> None:
        self.out = out_dir
        self.tmp = tmp_dir
        self.subdirs = subdirs
        self.durable = durable
        self.sidecars = sidecars
        self.made_dirs: set[str] = set()
        self.counter = 0

    def _put(self, rel: str, chunks, nbytes: int) -> None:  # noqa: ANN001
        parent = os.path.dirname(rel)
        if parent not in self.made_dirs:
            (self.out / parent).mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(parent)
        self.counter += 1
        tmp = self.tmp / f"{os.getpid()}-{self.counter}.part"
        f = RawFile(tmp)
        try:
            for c in chunks:
                f.write(c)
        finally:
            f.close(self.durable)
        os.replace(tmp, self.out / rel)

    def write(self, s: Sample) -> OutputRow:
        rel = rel_path(s.variant, s.image_id, s.ext, self.subdirs)
        self._put(rel, s.chunks, s.nbytes)
        if self.sidecars and s.doc:
            doc = s.doc
            if s.annotations is not None and any(m is not None for m in s.annotations.masks):
                doc = json.loads(json.dumps(doc))  # a copy: other variants share the same dict
                for seg, m in zip(doc["annotations"]["segmentations"], s.annotations.masks):
                    seg["mask_png"] = base64.b64encode(m).decode() if m is not None else None
            data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
            self._put(rel_path(s.variant, s.image_id, "json", self.subdirs), (data,), len(data))
        return OutputRow(s.variant, rel, s.nbytes, s.width, s.height)
