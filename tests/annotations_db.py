"""A small annotations database in the schema of ``engine/meta/schema.py``, with mask zips.

Rows are made up but shaped like the release's (several boxes per image with every flag,
human and machine labels, segmentations whose masks live in a zip relative to the metadata
directory, relationships, points), so the sinks can be checked against the database.
"""

from __future__ import annotations

import random
import sqlite3
import zipfile
from pathlib import Path
from typing import Sequence

import pyvips

from engine.meta import schema

CLASSES = [("/m/01g317", "Person"), ("/m/0199g", "Bicycle"), ("/m/0k4j", "Car"), ("/m/01yrx", "Cat"),
           ("/m/0bt9lr", "Dog"), ("/m/083wq", "Wheel")]


def _mask_png(seed: int) -> bytes:
    img = (pyvips.Image.black(40, 30) + (seed * 37 % 200 + 40)).cast("uchar")
    return img.pngsave_buffer()


def make_db(meta_dir: Path, image_ids: Sequence[str], *, seed: int = 3) -> Path:
    """``meta_dir/annotations.sqlite`` and ``meta_dir/masks/train-masks-0.zip``; returns the DB path."""
    meta_dir.mkdir(parents=True, exist_ok=True)
    db = meta_dir / "annotations.sqlite"
    conn = sqlite3.connect(db)
    for t in schema.TABLES:
        conn.execute(schema.create_table_sql(t, "sqlite"))
        for stmt in schema.index_sql(t):
            conn.execute(stmt)
    rng = random.Random(seed)
    conn.executemany("INSERT INTO classes(mid, name, boxable) VALUES (?,?,1)", CLASSES)
    (meta_dir / "masks").mkdir(exist_ok=True)
    zpath = meta_dir / "masks" / "train-masks-0.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for n, iid in enumerate(image_ids):
            if n % 5 == 4:
                continue  # some images have no annotations at all
            for k in range(rng.randint(1, 4)):
                mid = rng.choice(CLASSES)[0]
                x0, y0 = rng.random() * 0.5, rng.random() * 0.5
                conn.execute(
                    "INSERT INTO boxes(image_id, split, source, mid, confidence, x_min, x_max, y_min, y_max,"
                    " is_occluded, is_truncated, is_group_of, is_depiction, is_inside, xclick1x, xclick1y)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (iid, "train", "xclick", mid, 1.0, x0, x0 + 0.3, y0, y0 + 0.4, rng.randint(0, 1),
                     rng.randint(0, 1), rng.randint(0, 1), -1 if k == 2 else rng.randint(0, 1), 0, x0, y0),
                )
            conn.execute(
                "INSERT INTO image_labels(image_id, split, source, mid, confidence, kind) VALUES (?,?,?,?,?,?)",
                (iid, "train", "verification", CLASSES[n % 6][0], 1.0, "human"),
            )
            conn.execute(
                "INSERT INTO image_labels(image_id, split, source, mid, confidence, kind) VALUES (?,?,?,?,?,?)",
                (iid, "train", "verification", CLASSES[(n + 1) % 6][0], 0.0, "human"),
            )
            conn.execute(
                "INSERT INTO image_labels(image_id, split, source, mid, confidence, kind) VALUES (?,?,?,?,?,?)",
                (iid, "train", "machine", CLASSES[(n + 2) % 6][0], round(rng.random(), 2), "machine"),
            )
            if n % 2 == 0:
                for k in range(2):
                    member = f"{iid}_{CLASSES[k][0][3:]}_{k}.png"
                    if not (n % 4 == 2 and k == 1):  # one mask is missing from the zip: mask None
                        zf.writestr(member, _mask_png(n * 2 + k))
                    conn.execute(
                        "INSERT INTO segmentations(image_id, split, mid, box_id, mask_path, mask_zip, box_x_min,"
                        " box_x_max, box_y_min, box_y_max, predicted_iou, clicks) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (iid, "train", CLASSES[k][0], f"b{k}", member, "masks/train-masks-0.zip", 0.1, 0.6, 0.2,
                         0.7, 0.8, "0.1 0.2;0.3 0.4"),
                    )
            if n % 3 == 0:
                conn.execute(
                    "INSERT INTO relationships(image_id, split, mid1, mid2, x_min1, x_max1, y_min1, y_max1, x_min2,"
                    " x_max2, y_min2, y_max2, relationship) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (iid, "train", CLASSES[0][0], CLASSES[1][0], 0.1, 0.5, 0.1, 0.9, 0.4, 0.9, 0.5, 0.95, "on"),
                )
                conn.execute(
                    "INSERT INTO points(image_id, split, x, y, mid, estimated_yes_no, source, yes_votes, no_votes,"
                    " unsure_votes, text_label) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (iid, "train", 0.25, 0.75, CLASSES[3][0], "yes", "ih", 3, 0, 1, None),
                )
    conn.commit()
    conn.close()
    return db


def db_annotations(db: Path, meta_dir: Path) -> dict[str, dict]:
    """The database's rows per image, straight from SQL (the reference the samples must equal)."""
    conn = sqlite3.connect(db)
    names = dict(conn.execute("SELECT mid, name FROM classes"))
    out: dict[str, dict] = {}
    tables = {"boxes": "boxes", "labels": "image_labels", "segmentations": "segmentations",
              "relationships": "relationships", "points": "points"}
    for kind, table in tables.items():
        cur = conn.execute(f"SELECT * FROM {table}")
        cols = [d[0] for d in cur.description]
        for row in cur:
            rec = dict(zip(cols, row))
            iid = rec.pop("image_id")
            rec.pop("split")
            for m in ("mid", "mid1", "mid2"):
                if m in rec:
                    rec["name" + m[3:]] = names.get(rec[m])
            out.setdefault(iid, {k: [] for k in tables})[kind].append(rec)
    conn.close()
    zf = zipfile.ZipFile(meta_dir / "masks" / "train-masks-0.zip")
    names_in_zip = set(zf.namelist())
    for ann in out.values():
        for seg in ann["segmentations"]:
            seg["_mask"] = zf.read(seg["mask_path"]) if seg["mask_path"] in names_in_zip else None
    zf.close()
    return out
