"""``oidl-engine export``: YOLO, COCO or Pascal VOC labels for the images a run wrote.

The images are those OUT's state DB holds as ``ok`` with a file of the chosen variant;
the boxes (and, for COCO, the masks) come from the annotations database, a batch of
images per query, and are mapped into each file's pixels (:mod:`engine.meta.geometry`).
Everything is written into a temporary directory next to the destination and renamed
into place at the end, so an interrupted export never leaves a half-written one under
its final name. COCO JSON is streamed to disk piece by piece: memory does not grow with
the number of boxes.

Layouts (DEST defaults to ``OUT/export/<format>-<variant>``)::

    yolo   data.yaml, images/<split>/<id>.jpg (links), labels/<split>/<id>.txt
    coco   annotations/instances_<split>.json, images/<split>/<id>.jpg (links)
    voc    Annotations/<id>.xml, JPEGImages/<id>.jpg (links), ImageSets/Main/<split>.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence
from xml.sax.saxutils import escape

from .. import state
from ..inputs import is_safe_image_id
from ..layout import ORIGINAL
from ..variants import Mode, spec_from_name
from .geometry import Geometry, geometry_for, quarter_turns
from .select import SelectError, add_class_options, class_names, exit_status, resolve_classes
from .sql import Database, is_postgres_url, open_database, placeholders, stream

FORMATS = ("yolo", "coco", "voc")
#: written into every export: only a directory holding it is ever replaced by a new export
MARKER = ".oidl-export.json"
EXIT_USAGE = 2
#: images per annotations query
_BATCH = 500
#: FiftyOne's threshold for the Open Images mask PNGs (gray > 122 is the object)
MASK_THRESHOLD = 122
#: a mask whose box overlaps a box row this much belongs to that box
_MASK_MATCH_IOU = 0.9


class ExportError(Exception):
    """The export cannot be made as asked; the message is fit for the user (exit 2)."""


@dataclass(frozen=True)
class Category:
    mid: str
    name: str
    parent: str | None  # the hierarchy parent's name (COCO supercategory)


@dataclass
class Obj:
    """One labelled object in one file's pixels."""

    category: int  # index into the categories
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    group_of: bool = False
    occluded: bool = False
    truncated: bool = False
    rle: dict | None = None  # COCO RLE of the mask, counts as str
    mask_area: int | None = None


@dataclass
class Image:
    image_id: str
    split: str
    file: Path  # absolute path of our file
    width: int
    height: int
    objects: list[Obj] = field(default_factory=list)


# -- the state DB side -----------------------------------------------------------------------


def _files_only(conn: sqlite3.Connection) -> str:
    """The condition for outputs that are files of their own (not images inside a shard)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(outputs)")}
    return " AND o.shard_offset IS NULL" if "shard_offset" in cols else ""


def _variants(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(
        conn.execute(
            "SELECT o.variant, COUNT(*) FROM outputs o JOIN images i ON i.image_id = o.image_id "
            f"WHERE i.status = 'ok'{_files_only(conn)} GROUP BY o.variant ORDER BY o.variant"
        )
    )


def choose_variant(conn: sqlite3.Connection, wanted: str | None) -> str:
    have = _variants(conn)
    if not have:
        raise ExportError(
            "the state DB holds no written image files (run 'oidl-engine run' with --variant/--sizes first; "
            "images inside shards are labelled by the shards themselves)"
        )
    if wanted is not None:
        if wanted not in have:
            raise ExportError(f"no files of variant {wanted!r}; the run wrote: {', '.join(have)}")
        return wanted
    made = [v for v in have if v != ORIGINAL]
    if len(made) == 1:
        return made[0]
    if not made:
        return ORIGINAL
    raise ExportError(f"the run wrote several variants; choose one with --variant: {', '.join(have)}")


def _mode_of(variant: str) -> Mode | None:
    if variant == ORIGINAL:
        return None
    try:
        return spec_from_name(variant).mode
    except ValueError:
        raise ExportError(f"cannot tell the geometry of variant {variant!r}") from None


@dataclass(frozen=True)
class _Written:
    image_id: str
    split: str | None  # the list's Subset, when it has one
    rotation: float | None
    source_size: tuple[int, int]
    path: str
    file_size: tuple[int, int]


def _column(columns: Sequence[str], name: str) -> int | None:
    low = [c.lower() for c in columns]
    return low.index(name.lower()) if name.lower() in low else None


def iter_written(conn: sqlite3.Connection, variant: str) -> Iterator[_Written]:
    """The ok images with a file of ``variant``, in ImageID order, streamed."""
    lists = state.lists(conn)
    where = {lid: (_column(cols, "Rotation"), _column(cols, "Subset")) for lid, (_, _, cols) in lists.items()}
    rows = conn.execute(
        "SELECT i.image_id, i.width, i.height, i.list_id, i.fields, o.path, o.width, o.height "
        "FROM images i JOIN outputs o ON o.image_id = i.image_id AND o.variant = ? "
        f"WHERE i.status = 'ok'{_files_only(conn)} ORDER BY i.image_id",
        (variant,),
    )
    for image_id, w, h, list_id, fields_json, path, fw, fh in rows:
        fields = json.loads(fields_json) if fields_json else []
        i_rot, i_subset = where.get(list_id, (None, None))
        rotation = None
        if i_rot is not None and i_rot < len(fields) and fields[i_rot].strip():
            try:
                rotation = float(fields[i_rot])
            except ValueError:
                rotation = None
        split = fields[i_subset] if i_subset is not None and i_subset < len(fields) and fields[i_subset] else None
        if not (w and h and fw and fh):
            continue  # no size recorded: nothing to map onto
        yield _Written(image_id, split, rotation, (w, h), path, (fw, fh))


# -- categories ------------------------------------------------------------------------------


def categories(db: Database, names: Sequence[str], *, subclasses: bool) -> list[Category]:
    """The named classes (with their subclasses), else every boxable class, else every class with a box."""
    by_mid = dict(stream(db, "SELECT mid, name FROM classes"))
    parent_of: dict[str, str] = {}
    for parent, child in stream(db, "SELECT parent, child FROM class_edges WHERE relation = 'subcategory' ORDER BY parent"):
        parent_of.setdefault(child, parent)
    if names:
        mids: list[str] = []
        for req in resolve_classes(db, names, subclasses=subclasses):
            below = sorted(req.mids - {req.mid}, key=lambda m: (by_mid.get(m) or m).casefold())
            mids += [m for m in (req.mid, *below) if m not in mids]
    else:
        mids = [m for (m,) in stream(db, "SELECT mid FROM classes WHERE boxable = 1")]
        if not mids:
            mids = [m for (m,) in stream(db, "SELECT DISTINCT mid FROM boxes")]
        mids.sort(key=lambda m: ((by_mid.get(m) or m).casefold(), m))
    out = []
    for mid in mids:
        parent = parent_of.get(mid)
        out.append(Category(mid, by_mid.get(mid) or mid, (by_mid.get(parent) or parent) if parent else None))
    return out


# -- masks -----------------------------------------------------------------------------------


class _Masks:
    """Reads mask PNGs out of the release's zips (kept open: 16 per split)."""

    def __init__(self, meta_dir: Path | None) -> None:
        self.meta_dir = meta_dir.resolve() if meta_dir is not None else None
        self._zips: dict[str, zipfile.ZipFile | None] = {}
        self.missing = 0

    def _zip(self, rel: str) -> zipfile.ZipFile | None:
        if rel not in self._zips:
            zf = None
            if self.meta_dir is not None:
                path = (self.meta_dir / rel).resolve()
                if path.is_relative_to(self.meta_dir) and path.is_file():  # never outside the metadata dir
                    try:
                        zf = zipfile.ZipFile(path)
                    except (OSError, zipfile.BadZipFile):
                        zf = None
            self._zips[rel] = zf
        return self._zips[rel]

    def rle(self, zip_rel: str | None, member: str | None, geo: Geometry) -> tuple[dict, int] | None:
        """(COCO RLE, area in pixels) of one mask in the file's geometry; None when the mask is not here."""
        import numpy as np
        import pyvips
        from pycocotools import mask as mask_utils

        zf = self._zip(zip_rel) if zip_rel and member else None
        if zf is None:
            self.missing += 1
            return None
        try:
            data = zf.read(member)
            img = geo.mask(pyvips.Image.new_from_buffer(data, "", access="sequential"))
            arr = np.ndarray(buffer=img.cast("uchar").write_to_memory(), dtype=np.uint8, shape=(img.height, img.width))
        except (KeyError, OSError, zipfile.BadZipFile, pyvips.Error):
            self.missing += 1
            return None
        binary = np.asfortranarray((arr > MASK_THRESHOLD).astype(np.uint8))
        rle = mask_utils.encode(binary)
        return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}, int(binary.sum())

    def close(self) -> None:
        for zf in self._zips.values():
            if zf is not None:
                zf.close()


def _have_pycocotools() -> bool:
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        print("warning: COCO without segmentations: the masks need pycocotools (pip install 'oidl-engine[export]')",
              file=sys.stderr)
        return False
    return True


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -- the writers -----------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _link(link: Path, target: Path, final_dir: Path, built_dir: Path) -> None:
    """A relative symlink at ``link`` (inside the build dir) that resolves once moved to ``final_dir``."""
    final_link = final_dir / link.relative_to(built_dir)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, final_link.parent), link)


class _Writer:
    def __init__(self, root: Path, final: Path, cats: Sequence[Category]) -> None:
        self.root = root
        self.final = final
        self.cats = cats
        self.splits: dict[str, int] = {}

    def add(self, img: Image) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class YoloWriter(_Writer):
    """ultralytics' layout: images/<split> and labels/<split> side by side, data.yaml."""

    def add(self, img: Image) -> None:
        self.splits[img.split] = self.splits.get(img.split, 0) + 1
        _link(self.root / "images" / img.split / img.file.name, img.file, self.final, self.root)
        lines = []
        for o in img.objects:
            x0, y0, x1, y1 = o.box
            cx, cy = (x0 + x1) / 2 / img.width, (y0 + y1) / 2 / img.height
            w, h = (x1 - x0) / img.width, (y1 - y0) / img.height
            lines.append(f"{o.category} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
        labels = self.root / "labels" / img.split
        labels.mkdir(parents=True, exist_ok=True)
        (labels / f"{img.image_id}.txt").write_text("".join(lines), encoding="utf-8")

    def finish(self) -> None:
        keys = {"train": "train", "validation": "val", "test": "test"}
        lines = [f"path: {json.dumps(str(self.final.resolve()))}"]
        for split in self.splits:
            lines.append(f"{keys.get(split, json.dumps(split))}: images/{split}")
        # ultralytics refuses a data.yaml without both train and val: borrow the other split
        present = [s for s in ("train", "validation") if s in self.splits] or list(self.splits)[:1]
        for split, key in (("train", "train"), ("validation", "val")):
            if split not in self.splits and present:
                lines.append(f"{key}: images/{present[0]}  # the export holds no {split} images")
        lines.append(f"nc: {len(self.cats)}")
        lines.append("names:")
        lines += [f"  {i}: {json.dumps(c.name)}" for i, c in enumerate(self.cats)]
        _atomic_text(self.root / "data.yaml", "\n".join(lines) + "\n")


class CocoWriter(_Writer):
    """One instances_<split>.json per split, streamed: the images and annotations arrays go
    to temporary files as they come and are joined at the end."""

    def __init__(self, root: Path, final: Path, cats: Sequence[Category]) -> None:
        super().__init__(root, final, cats)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        self._parts: dict[str, tuple[IO[str], IO[str]]] = {}
        self._next_ann = 1

    def _files(self, split: str) -> tuple[IO[str], IO[str]]:
        if split not in self._parts:
            base = self.root / "annotations"
            self._parts[split] = (
                open(base / f".{split}.images.part", "w", encoding="utf-8"),
                open(base / f".{split}.annotations.part", "w", encoding="utf-8"),
            )
        return self._parts[split]

    def add(self, img: Image) -> None:
        n = self.splits.get(img.split, 0) + 1
        self.splits[img.split] = n
        _link(self.root / "images" / img.split / img.file.name, img.file, self.final, self.root)
        images, anns = self._files(img.split)
        entry = {"id": n, "file_name": img.file.name, "width": img.width, "height": img.height, "oi_image_id": img.image_id}
        images.write(("," if n > 1 else "") + json.dumps(entry))
        for o in img.objects:
            x0, y0, x1, y1 = o.box
            w, h = x1 - x0, y1 - y0
            ann = {
                "id": self._next_ann,
                "image_id": n,
                "category_id": o.category + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                "area": round(w * h, 2) if o.mask_area is None else o.mask_area,
                "iscrowd": 1 if o.group_of else 0,
            }
            if o.rle is not None:
                ann["segmentation"] = o.rle
            anns.write(("," if anns.tell() else "") + json.dumps(ann))
            self._next_ann += 1

    def finish(self) -> None:
        cats = [
            {"id": i + 1, "name": c.name, "supercategory": c.parent or "none", "oi_mid": c.mid} for i, c in enumerate(self.cats)
        ]
        for split, (images, anns) in self._parts.items():
            images.close()
            anns.close()
            out = self.root / "annotations" / f"instances_{split}.json"
            with open(out, "w", encoding="utf-8") as f:
                f.write('{"info": ' + json.dumps({"description": f"Open Images {split}, exported by oidl-engine"}))
                f.write(', "licenses": [], "images": [')
                with open(images.name, encoding="utf-8") as part:
                    shutil.copyfileobj(part, f)
                f.write('], "annotations": [')
                with open(anns.name, encoding="utf-8") as part:
                    shutil.copyfileobj(part, f)
                f.write('], "categories": ' + json.dumps(cats) + "}\n")
            os.unlink(images.name)
            os.unlink(anns.name)

    def close(self) -> None:
        for images, anns in self._parts.values():
            images.close()
            anns.close()


class VocWriter(_Writer):
    """Pascal VOC: one XML per image, 1-based inclusive pixel corners."""

    def __init__(self, root: Path, final: Path, cats: Sequence[Category]) -> None:
        super().__init__(root, final, cats)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        self._sets: dict[str, IO[str]] = {}

    def add(self, img: Image) -> None:
        self.splits[img.split] = self.splits.get(img.split, 0) + 1
        _link(self.root / "JPEGImages" / img.file.name, img.file, self.final, self.root)
        if img.split not in self._sets:
            self._sets[img.split] = open(self.root / "ImageSets" / "Main" / f"{img.split}.txt", "w", encoding="utf-8")
        self._sets[img.split].write(img.image_id + "\n")
        objs = []
        for o in img.objects:
            x0, y0, x1, y1 = o.box
            xmin, ymin = min(img.width, int(round(x0)) + 1), min(img.height, int(round(y0)) + 1)
            xmax, ymax = max(xmin, int(round(x1))), max(ymin, int(round(y1)))
            objs.append(
                "  <object>\n"
                f"    <name>{escape(self.cats[o.category].name)}</name>\n"
                "    <pose>Unspecified</pose>\n"
                f"    <truncated>{int(o.truncated)}</truncated>\n"
                f"    <occluded>{int(o.occluded)}</occluded>\n"
                f"    <group_of>{int(o.group_of)}</group_of>\n"
                "    <difficult>0</difficult>\n"
                f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>\n"
                "  </object>\n"
            )
        xml = (
            "<annotation>\n"
            "  <folder>JPEGImages</folder>\n"
            f"  <filename>{escape(img.file.name)}</filename>\n"
            "  <source><database>Open Images</database></source>\n"
            f"  <size><width>{img.width}</width><height>{img.height}</height><depth>3</depth></size>\n"
            "  <segmented>0</segmented>\n" + "".join(objs) + "</annotation>\n"
        )
        (self.root / "Annotations" / f"{img.image_id}.xml").write_text(xml, encoding="utf-8")

    def finish(self) -> None:
        for f in self._sets.values():
            f.close()


_WRITERS = {"yolo": YoloWriter, "coco": CocoWriter, "voc": VocWriter}


# -- the export ------------------------------------------------------------------------------


@dataclass
class Summary:
    images: int = 0
    objects: int = 0
    outside: int = 0  # boxes cut away entirely by fill-crop
    masks: int = 0
    masks_missing: int = 0
    splits: dict[str, int] = field(default_factory=dict)


def _annotations(
    db: Database, ids: Sequence[str], mids: dict[str, int], with_masks: bool
) -> tuple[dict[str, str], dict[str, list[tuple]], dict[str, list[tuple]]]:
    ph = placeholders(len(ids))
    splits = dict(stream(db, f"SELECT image_id, split FROM images WHERE image_id IN ({ph})", ids))
    boxes: dict[str, list[tuple]] = {}
    masks: dict[str, list[tuple]] = {}
    # the class filter is applied here, not in SQL: ids and MIDs together could pass the
    # backends' limit on parameters, and the image_id index already narrows to a few rows
    for row in stream(
        db,
        "SELECT image_id, mid, x_min, x_max, y_min, y_max, is_group_of, is_occluded, is_truncated FROM boxes "
        f"WHERE image_id IN ({ph}) ORDER BY image_id, mid, x_min, y_min",
        ids,
    ):
        if row[1] in mids:
            boxes.setdefault(row[0], []).append(row[1:])
    if with_masks:
        for row in stream(
            db,
            "SELECT image_id, mid, box_x_min, box_x_max, box_y_min, box_y_max, mask_zip, mask_path FROM segmentations "
            f"WHERE image_id IN ({ph}) ORDER BY image_id, mask_path",
            ids,
        ):
            if row[1] in mids:
                masks.setdefault(row[0], []).append(row[1:])
    return splits, boxes, masks


def _objects(
    geo: Geometry, boxes: list[tuple], masks: list[tuple], index: dict[str, int], mask_reader: _Masks | None, summary: Summary
) -> list[Obj]:
    objs: list[Obj] = []
    for mid, x0, x1, y0, y1, group_of, occluded, truncated in boxes:
        if None in (x0, x1, y0, y1):
            continue
        px = geo.box(x0, x1, y0, y1)
        if px is None:
            summary.outside += 1
            continue
        objs.append(Obj(index[mid], px, group_of == 1, occluded == 1, truncated == 1))
    if mask_reader is not None:
        for mid, x0, x1, y0, y1, zip_rel, member in masks:
            px = geo.box(x0, x1, y0, y1) if None not in (x0, x1, y0, y1) else None
            got = mask_reader.rle(zip_rel, member, geo)
            if got is None:
                continue
            summary.masks += 1
            rle, area = got
            # the mask of a box row: attach it there, else it is an object of its own
            best = max(
                (o for o in objs if o.category == index[mid] and o.rle is None and px is not None),
                key=lambda o: _iou(o.box, px),  # type: ignore[arg-type]
                default=None,
            )
            if best is not None and px is not None and _iou(best.box, px) >= _MASK_MATCH_IOU:
                best.rle, best.mask_area = rle, area
            elif px is not None:
                objs.append(Obj(index[mid], px, rle=rle, mask_area=area))
    return objs


class _Progress:
    """A rich bar on a terminal, else a line every 5 s."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._bar = None
        self._last = time.monotonic()
        self._t0 = self._last
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self._bar = Progress("export", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("export", total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self._last >= 5.0:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            print(f"export: {self.done}/{self.total} images, {rate:.0f}/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def export(
    db: Database,
    out_dir: Path,
    *,
    fmt: str,
    variant: str | None = None,
    dest: Path | None = None,
    state_db: Path | None = None,
    class_names_: Sequence[str] = (),
    subclasses: bool = False,
    meta_dir: Path | None = None,
) -> tuple[Path, Summary]:
    """Write the export; returns (its directory, counts). ExportError / SelectError for bad input."""
    if fmt not in _WRITERS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    state_path = state_db or out_dir / "oidl.sqlite"
    if not state_path.is_file():
        raise ExportError(f"no state DB at {state_path}: is {out_dir} the --out of an 'oidl-engine run'?")
    conn = state.connect(state_path, readonly=True)
    try:
        variant = choose_variant(conn, variant)
        mode = _mode_of(variant)
        applied = state.get_meta(conn, "apply_rotation")
        cats = categories(db, class_names_, subclasses=subclasses)
        if not cats:
            raise ExportError("no classes to export: the annotations database has no boxable class and no box")
        final = (dest or out_dir / "export" / f"{fmt}-{variant}").absolute()
        if final.exists() and not (final / MARKER).is_file():
            # replacing it would delete whatever the user keeps there
            raise ExportError(f"{final} exists and is not an earlier export: choose another --dest")
        final.parent.mkdir(parents=True, exist_ok=True)
        built = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(built, ignore_errors=True)
        built.mkdir()
        try:
            summary = _export_into(conn, db, out_dir, built, final, fmt, variant, mode, applied, cats, meta_dir)
            (built / MARKER).write_text(json.dumps({"format": fmt, "variant": variant, "images": summary.images}) + "\n")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if final.exists():
                os.replace(final, old)
            os.replace(built, final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(built, ignore_errors=True)
            raise
    finally:
        conn.close()
    return final, summary


def _export_into(
    conn: sqlite3.Connection,
    db: Database,
    out_dir: Path,
    built: Path,
    final: Path,
    fmt: str,
    variant: str,
    mode: Mode | None,
    applied: str | None,
    cats: list[Category],
    meta_dir: Path | None,
) -> Summary:
    index = {c.mid: i for i, c in enumerate(cats)}
    writer = _WRITERS[fmt](built, final, cats)
    masks = _Masks(meta_dir) if fmt == "coco" and _have_pycocotools() else None
    summary = Summary()
    (total,) = conn.execute(
        "SELECT COUNT(*) FROM images i JOIN outputs o ON o.image_id = i.image_id AND o.variant = ? "
        f"WHERE i.status = 'ok'{_files_only(conn)}",
        (variant,),
    ).fetchone()
    progress = _Progress(total)
    out_root = out_dir.absolute()
    try:
        batch: list[_Written] = []

        def flush() -> None:
            ids = [w.image_id for w in batch]
            splits, boxes, segs = _annotations(db, ids, index, masks is not None)
            for w in batch:
                turns = quarter_turns(w.rotation)
                source, file_size = w.source_size, w.file_size
                if applied == state.MIXED and turns:
                    raise ExportError(
                        f"{w.image_id} has Rotation {w.rotation:g} but runs into {out_dir} differed in "
                        "--apply-rotation, so its file's orientation is unknown: re-run into a fresh --out"
                    )
                if mode is None:  # a kept original is the download itself: never turned
                    if applied == "1" and turns % 2:  # but its recorded size is the turned one
                        source = file_size = (file_size[1], file_size[0])
                elif applied == "1":
                    turns = 0
                geo = geometry_for(mode, source, file_size, turns)
                mid_of_segs = segs.get(w.image_id, []) if masks is not None else []
                objs = _objects(geo, boxes.get(w.image_id, []), mid_of_segs, index, masks, summary)
                split = splits.get(w.image_id) or w.split or "unsplit"
                if not is_safe_image_id(w.image_id) or not is_safe_image_id(split):
                    continue  # never a path from an unchecked name
                writer.add(Image(w.image_id, split, out_root / w.path, file_size[0], file_size[1], objs))
                summary.images += 1
                summary.objects += len(objs)
                summary.splits[split] = summary.splits.get(split, 0) + 1
            progress.advance(len(batch))
            batch.clear()

        for w in iter_written(conn, variant):
            batch.append(w)
            if len(batch) >= _BATCH:
                flush()
        if batch:
            flush()
        writer.finish()
    finally:
        progress.close()
        if isinstance(writer, CocoWriter):
            writer.close()
        if masks is not None:
            summary.masks_missing = masks.missing
            masks.close()
    return summary


# -- CLI -------------------------------------------------------------------------------------

COMMANDS = ("export",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write YOLO, COCO or Pascal VOC labels for the images a run wrote",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="For every image OUT's state DB holds as ok, write its boxes (COCO: and masks) from the "
        "annotations database in the pixel geometry of the variant's files: rotation, fill-crop and pad are "
        "taken into account. Layouts: yolo = data.yaml, images/<split>/ (links to our files), labels/<split>/*.txt; "
        "coco = annotations/instances_<split>.json, images/<split>/; voc = Annotations/*.xml, JPEGImages/, "
        "ImageSets/Main/<split>.txt. The export is built next to DEST and renamed into place.",
    )
    p.add_argument("--db", required=True, metavar="TARGET", help="annotations database: a SQLite file or a postgresql:// URL")
    p.add_argument("--out", required=True, type=Path, help="the output directory of 'oidl-engine run'")
    p.add_argument("--format", required=True, choices=FORMATS, help="label format")
    p.add_argument("--variant", help="which files to label (a directory name under OUT, or 'original'); needed when "
                   "the run wrote several variants")
    p.add_argument("--dest", type=Path, help="where to write the export (default: OUT/export/<format>-<variant>)")
    p.add_argument("--state-db", type=Path, help="the run's state DB (default: OUT/oidl.sqlite)")
    p.add_argument(
        "--meta-dir",
        type=Path,
        help="the metadata directory holding the mask zips, for COCO segmentations (default: the SQLite "
        "database's directory)",
    )
    add_class_options(p, required=False)


def run(args: argparse.Namespace) -> int:
    meta_dir = args.meta_dir
    if meta_dir is None and not is_postgres_url(str(args.db)):
        meta_dir = Path(args.db).parent

    def body() -> int:
        with open_database(args.db) as db:
            final, s = export(
                db,
                args.out,
                fmt=args.format,
                variant=args.variant,
                dest=args.dest,
                state_db=args.state_db,
                class_names_=class_names(args),
                subclasses=args.subclasses,
                meta_dir=meta_dir,
            )
        per_split = ", ".join(f"{k} {v}" for k, v in s.splits.items())
        line = f"exported {s.images} images ({per_split or 'none'}), {s.objects} objects to {final}"
        if s.outside:
            line += f"; {s.outside} boxes fell outside the cropped files"
        if args.format == "coco":
            line += f"; {s.masks} masks" + (f", {s.masks_missing} not found (mask zips absent)" if s.masks_missing else "")
        print(line, file=sys.stderr)
        return 0

    return exit_status(body, (ExportError, SelectError))
