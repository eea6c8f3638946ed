"""Per-image annotations from the annotations database (``engine/meta/schema.py``).

``run --annotations TARGET`` attaches to every sample what the database holds for its image:
boxes, image-level labels (human and machine, with confidence), segmentations (with the mask
PNG read from the release's mask zips when they are present), relationships and points, each
with the display names of its classes. Lookups are batched: one query per table for a whole
batch of ImageIDs (the writer asks once per batch of rows), so a run with annotations costs a
few milliseconds per few hundred images.

Coordinates are returned exactly as stored: normalised to [0, 1] relative to the image as
annotators saw it (after ``Rotation``).

Public surface (also what the web UI uses to draw boxes)::

    src = AnnotationSource("oi.sqlite", metadata_dir=None)   # or "postgresql://..."
    anns = src.lookup(["000002b66c9c498e", ...])              # {image_id: ImageAnnotations}
    anns["000002b66c9c498e"].boxes[0]                          # {"mid": ..., "name": ..., "x_min": ...}
    src.label_map()                                            # [(mid, display name)] in a stable order
    src.close()
"""

from __future__ import annotations

import sqlite3
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..meta import schema

#: what each annotation table contributes, and the field that names its class(es)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    # sample key: (table, mid columns that get a display name)
    "boxes": ("boxes", ("mid",)),
    "labels": ("image_labels", ("mid",)),
    "segmentations": ("segmentations", ("mid",)),
    "relationships": ("relationships", ("mid1", "mid2")),
    "points": ("points", ("mid",)),
}
#: columns every annotation row has that a sample does not need again
_DROP = ("image_id", "split")
#: a mask PNG larger than this is not attached (Open Images masks are a few KB)
MAX_MASK_BYTES = 16 * 1024 * 1024
#: SQLite's host-parameter limit is 999 on old builds
_CHUNK = 900


class AnnotationsError(Exception):
    """The annotations database cannot be opened or is not one ``db import`` made."""


def _name_col(mid_col: str) -> str:
    return "name" + mid_col[3:]  # mid -> name, mid1 -> name1


def fields_of(kind: str) -> tuple[tuple[str, str], ...]:
    """(column, logical type) of one annotation kind as a sample carries it (names included)."""
    table, mids = KINDS[kind]
    cols: list[tuple[str, str]] = [(c, t) for c, t in schema.BY_NAME[table].columns if c not in _DROP]
    for m in mids:
        i = next(k for k, (c, _) in enumerate(cols) if c == m)
        cols.insert(i + 1, (_name_col(m), schema.TEXT))
    return tuple(cols)


@dataclass
class ImageAnnotations:
    """What the database holds for one image. Lists of dicts keyed by :func:`fields_of`."""

    image_id: str
    boxes: list[dict[str, Any]] = field(default_factory=list)
    labels: list[dict[str, Any]] = field(default_factory=list)
    segmentations: list[dict[str, Any]] = field(default_factory=list)
    relationships: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    #: mask PNG bytes, aligned with ``segmentations`` (None where the zip is not on disk)
    masks: list[bytes | None] = field(default_factory=list)

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        """JSON-ready annotations (masks are separate: PNG members, not JSON)."""
        return {k: getattr(self, k) for k in KINDS}


def _is_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def connect(target: str | Path) -> tuple[Any, str]:
    """(DB-API connection, parameter marker) for a SQLite path or a ``postgresql://`` URL."""
    t = str(target)
    if _is_url(t):
        try:
            import psycopg  # type: ignore[import-not-found]
        except ImportError:
            raise AnnotationsError("a postgresql:// annotations database needs psycopg: pip install 'psycopg[binary]'") from None
        try:
            return psycopg.connect(t, autocommit=True), "%s"
        except Exception as e:  # psycopg.OperationalError and friends
            raise AnnotationsError(f"cannot connect to {t.split('@')[-1]}: {e}") from None
    p = Path(t)
    if not p.is_file():
        raise AnnotationsError(f"no annotations database at {p}")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
        conn.execute("SELECT 1 FROM boxes LIMIT 1").fetchall()
    except sqlite3.Error as e:
        raise AnnotationsError(f"{p} is not an annotations database (oidl-engine db import): {e}") from None
    return conn, "?"


class AnnotationSource:
    """Batched per-image lookups against the annotations database (read only)."""

    def __init__(self, target: str | Path, metadata_dir: Path | None = None) -> None:
        self.target = str(target)
        self.conn, self.mark = connect(target)
        # Mask zips are recorded relative to the metadata directory; by default the DB sits in it.
        if metadata_dir is None and not _is_url(self.target):
            metadata_dir = Path(self.target).resolve().parent
        self.metadata_dir = metadata_dir.resolve() if metadata_dir is not None else None
        self._zips: dict[str, zipfile.ZipFile | None] = {}
        self.names: dict[str, str] = dict(self._query("SELECT mid, name FROM classes", ()))

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        try:
            cur = self.conn.cursor()
            try:
                cur.execute(sql, tuple(params))
                return cur.fetchall()
            finally:
                cur.close()
        except Exception as e:  # sqlite3.Error, psycopg.Error: one clear message, not a writer crash loop
            raise AnnotationsError(f"query on {self.target.split('@')[-1]} failed: {e}") from None

    def lookup(self, image_ids: Sequence[str]) -> dict[str, ImageAnnotations]:
        """Annotations of every image in ``image_ids`` (an entry for each, empty when none)."""
        out = {i: ImageAnnotations(i) for i in image_ids}
        ids = list(out)
        for kind, (table, mids) in KINDS.items():
            cols = [c for c, _ in schema.BY_NAME[table].columns if c not in _DROP]
            select = ", ".join(["image_id", *cols])
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                marks = ",".join([self.mark] * len(chunk))
                for row in self._query(f"SELECT {select} FROM {table} WHERE image_id IN ({marks})", chunk):
                    rec = dict(zip(cols, row[1:]))
                    for m in mids:
                        rec[_name_col(m)] = self.names.get(rec[m]) if rec[m] is not None else None
                    # keep the schema's column order, names right after their MIDs
                    getattr(out[row[0]], kind).append({c: rec[c] for c, _ in fields_of(kind)})
        for ann in out.values():
            ann.masks = [self._mask(s.get("mask_zip"), s.get("mask_path")) for s in ann.segmentations]
        return out

    def _mask(self, zip_rel: str | None, member: str | None) -> bytes | None:
        if not zip_rel or not member or self.metadata_dir is None:
            return None
        zf = self._zips.get(zip_rel, False)
        if zf is False:
            zf = None
            p = (self.metadata_dir / zip_rel).resolve()
            # the DB names the zip; it must still be a file inside the metadata directory
            if p.is_relative_to(self.metadata_dir) and p.is_file():
                try:
                    zf = zipfile.ZipFile(p)
                except (OSError, zipfile.BadZipFile):
                    zf = None
            self._zips[zip_rel] = zf
        if zf is None:
            return None
        try:
            info = zf.getinfo(member)  # a member name, never a filesystem path
            if info.file_size > MAX_MASK_BYTES:
                return None
            return zf.read(info)
        except (KeyError, OSError, zipfile.BadZipFile):
            return None

    def label_map(self) -> list[tuple[str, str]]:
        """(MID, display name) of every class, sorted by MID: a stable class index for TFRecord labels.

        The ``classes`` table when it is filled, else the MIDs the annotations use.
        """
        if self.names:
            return sorted(self.names.items())
        mids: set[str] = set()
        for table, col in (("boxes", "mid"), ("image_labels", "mid"), ("segmentations", "mid")):
            mids.update(r[0] for r in self._query(f"SELECT DISTINCT {col} FROM {table}", ()) if r[0])
        return [(m, m) for m in sorted(mids)]

    def close(self) -> None:
        for zf in self._zips.values():
            if zf is not None:
                zf.close()
        self._zips.clear()
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
            pass
