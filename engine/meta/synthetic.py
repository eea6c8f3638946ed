"""Generated Open Images metadata in the real layouts and column shapes, for tests and bench.

Nothing here is real data: IDs, MIDs and coordinates are random (seeded, so reproducible);
what matters is that every file ``oidl-engine metadata`` fetches exists with the real file
name, header (or lack of one), column order and quoting, so the importer meets what it will
meet on the real release. :func:`write_release` can plant malformed rows and reports exactly
what a correct import must contain.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.meta.download import NARRATIVES, RELEASES

IMAGE_HEADER = (
    "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,"
    "OriginalSize,OriginalMD5,Thumbnail300KURL,Rotation"
).split(",")
BOX_HEADER_V6 = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,"
    "IsInside,XClick1X,XClick2X,XClick3X,XClick4X,XClick1Y,XClick2Y,XClick3Y,XClick4Y"
).split(",")
BOX_HEADER_V5 = BOX_HEADER_V6[:13]
LABEL_HEADER = ["ImageID", "Source", "LabelName", "Confidence"]
SEG_HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks".split(",")
VRD_HEADER = "ImageID,LabelName1,LabelName2,XMin1,XMax1,YMin1,YMax1,XMin2,XMax2,YMin2,YMax2,RelationshipLabel".split(",")
POINT_HEADER = "ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,TextLabel".split(",")
_SPLIT_OF = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def _hex16(rng: random.Random) -> str:
    return f"{rng.getrandbits(64):016x}"


def _mid(rng: random.Random) -> str:
    return "/m/0" + "".join(rng.choice("0123456789abcdefghjklmnpqrstvwxyz_") for _ in range(rng.randint(3, 6)))


def _coords(rng: random.Random) -> list[str]:
    x0, x1 = sorted((rng.random(), rng.random()))
    y0, y1 = sorted((rng.random(), rng.random()))
    return [f"{x0:.6f}", f"{x1:.6f}", f"{y0:.6f}", f"{y1:.6f}"]


def write_boxes(path: Path, rows: int, *, seed: int = 0, classes: int = 600, boxes_per_image: int = 8) -> int:
    """A v6-shaped train boxes CSV (21 columns, header) with ``rows`` rows; returns its byte size.

    Rows are grouped by image as in the real file, classes follow a long tail, coordinates
    have the real file's 6 decimals (about 153 bytes a row, as the real file). numpy makes the
    columns and pyarrow writes them, a block at a time: a 3M-row file takes seconds, little memory.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    mids = np.array([_mid(random.Random(seed * 1000 + i)) for i in range(classes)], dtype=object)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = 200_000
    with path.open("wb") as f:
        f.write((",".join(BOX_HEADER_V6) + "\n").encode())
        done = 0
        while done < rows:
            n = min(block, rows - done)
            image_no = (done + np.arange(n)) // boxes_per_image + 1
            mixed = image_no.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)  # wraps: fine
            ids = np.char.mod("%016x", mixed)
            # a long tail; the most frequent class holds ~6 % of the boxes (the real top, Person, ~7 %)
            cls = np.minimum((rng.pareto(1.2, n) * 20).astype(np.int64), classes - 1)
            x = np.sort(rng.random((n, 2)), axis=1).round(6)
            y = np.sort(rng.random((n, 2)), axis=1).round(6)
            cols = {
                "ImageID": pa.array(ids.astype(str)), "Source": pa.repeat(pa.scalar("xclick"), n),
                "LabelName": pa.array(mids[cls].astype(str)), "Confidence": pa.repeat(pa.scalar(1), n),
                "XMin": x[:, 0], "XMax": x[:, 1], "YMin": y[:, 0], "YMax": y[:, 1],
            }
            for name in ("IsOccluded", "IsTruncated"):
                cols[name] = rng.integers(0, 2, n)
            for name in ("IsGroupOf", "IsDepiction", "IsInside"):
                cols[name] = np.zeros(n, dtype=np.int64)
            mx, my = ((x[:, 0] + x[:, 1]) / 2).round(6), ((y[:, 0] + y[:, 1]) / 2).round(6)
            for name, v in zip(BOX_HEADER_V6[13:], (x[:, 0], x[:, 1], mx, x[:, 0], my, y[:, 0], y[:, 1], my)):
                cols[name] = v
            table = pa.table({k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)) for k, v in cols.items()})
            pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, quoting_style="none"))
            done += n
    return path.stat().st_size


@dataclass
class Release:
    """What :func:`write_release` wrote: the rows a correct import must hold."""

    root: Path
    #: table -> number of valid rows in the files (after the documented de-duplication)
    expected: dict[str, int] = field(default_factory=dict)
    #: number of malformed rows planted (each must be reported and skipped)
    malformed: int = 0
    class_names: dict[str, str] = field(default_factory=dict)


def write_release(root: Path, *, release: str = "v7", rows: int = 200, seed: int = 1, narratives: bool = True) -> Release:
    """Every file of ``oidl-engine metadata --release RELEASE`` (v6/v7) under ``root``.

    Includes the overlaps the real release has (the boxable train list is a subset of the
    v6 train list, the ``-boxable`` label files repeat rows of the full ones), class names
    with commas, titles with quotes and commas, and ``malformed`` bad rows.
    """
    rng = random.Random(seed)
    out = Release(root)
    # classes: a few with commas in their names, the way the real list has them
    mids = sorted({_mid(rng) for _ in range(60)})
    names = {m: f"Class {i}" for i, m in enumerate(mids)}
    names[mids[0]], names[mids[1]], names[mids[2]] = "Ducks, geese and swans", "Cat", "Dog"
    out.class_names = names
    boxable = mids[:40]
    trainable = mids[10:55]
    segmentable = mids[:20]
    entity = "/m/0bl9f"
    # images per split; the boxable train list is a subset of the v6 train list
    split_images = {s: sorted({_hex16(rng) for _ in range(rows // 4)}) for s in ("train", "validation", "test")}
    extra_train = sorted({_hex16(rng) for _ in range(rows // 4)})
    all_images = {s: list(v) for s, v in split_images.items()}
    all_images["train"] += extra_train
    out.expected = {t: 0 for t in ("images", "image_labels", "boxes", "segmentations", "relationships", "points", "narratives")}
    out.expected["images"] = sum(len(v) for v in all_images.values())
    bad_count = 0

    def write_csv(rel: str, header: list[str] | None, rows_: list[list[str]], *, bad: list[str] = ()) -> None:
        nonlocal bad_count
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        s = io.StringIO()
        w = csv.writer(s, lineterminator="\n")
        if header:
            w.writerow(header)
        for i, r in enumerate(rows_):
            w.writerow(r)
            if bad and i == len(rows_) // 2:
                for b in bad:  # raw lines, written as they are
                    s.write(b + "\n")
                bad_count += len(bad)
        p.write_text(s.getvalue(), encoding="utf-8")

    def image_row(i: str, split: str) -> list[str]:
        rot = rng.choice(["0.0", "0.0", "90.0", "270.0", "", "180.0"])
        title = rng.choice(["Downtown Detroit", 'A "quoted", title', "Paris on Ponce &amp; Le Maison Rouge", "Ça, c'est ça"])
        photo = rng.randint(10**9, 10**10)
        return [
            i, split, f"https://c1.staticflickr.com/1/2/{photo}_abc_o.jpg", f"https://www.flickr.com/photos/x/{photo}",
            "https://creativecommons.org/licenses/by/2.0/", "https://www.flickr.com/people/x/", "Daniel X. O&#x27;Neil",
            title, str(rng.randint(10_000, 9_000_000)), "CyvuYIfw90WAr8y0a1PaOw==", "", rot,
        ]

    rel_of = {f.relpath.rsplit("/", 1)[-1]: f.relpath for f in RELEASES[release]}
    # --- image lists (one malformed row in the v6 train list: a column short) -----------------------
    write_csv(rel_of["train-images-boxable-with-rotation.csv"], IMAGE_HEADER, [image_row(i, "train") for i in split_images["train"]])
    write_csv(rel_of["validation-images-with-rotation.csv"], IMAGE_HEADER, [image_row(i, "validation") for i in all_images["validation"]])
    write_csv(rel_of["test-images-with-rotation.csv"], IMAGE_HEADER, [image_row(i, "test") for i in all_images["test"]])
    write_csv(
        rel_of["oidv6-train-images-with-labels-with-rotation.csv"], IMAGE_HEADER,
        [image_row(i, "train") for i in sorted(all_images["train"])], bad=["deadbeefdeadbeef,train,https://x/y.jpg"],
    )

    # --- class files ----------------------------------------------------------------------------------
    desc = [[m, names[m]] for m in mids]
    if release == "v7":
        write_csv(rel_of["oidv7-class-descriptions.csv"], ["LabelName", "DisplayName"], desc)
        write_csv(rel_of["oidv7-class-descriptions-boxable.csv"], None, [[m, names[m]] for m in boxable])
        (root / rel_of["oidv7-classes-trainable.txt"]).write_text("".join(m + "\n" for m in trainable))
    else:
        write_csv(rel_of["oidv6-class-descriptions.csv"], ["LabelName", "DisplayName"], desc)
        write_csv(rel_of["oidv6-class-descriptions-boxable.csv"], None, [[m, names[m]] for m in boxable])
        (root / rel_of["oidv6-classes-trainable.txt"]).write_text("".join(m + "\n" for m in trainable))
    write_csv(rel_of["class-descriptions-boxable.csv"], None, [[m, names[m]] for m in boxable])
    (root / rel_of["classes-segmentation.txt"]).write_text("".join(m + "\n" for m in segmentable))
    # hierarchy: Entity -> first 5 boxable; each of those -> 3 more by Subcategory, one Part
    sub = []
    for k in range(5):
        kids = boxable[5 + 3 * k : 8 + 3 * k]
        node: dict = {"LabelName": boxable[k], "Subcategory": [{"LabelName": c} for c in kids]}
        node["Part"] = [{"LabelName": boxable[30 + k]}]
        sub.append(node)
    (root / rel_of["bbox_labels_600_hierarchy.json"]).write_text(json.dumps({"LabelName": entity, "Subcategory": sub}))
    out.expected["class_edges"] = 5 + 15 + 5
    out.expected["classes"] = len(mids) + 1  # + Entity, the hierarchy's root
    attrs = [["/m/02gy9n", "Transparent"], ["/m/05z87", "Plastic"], ["/m/0dnr7", "Textile"], ["/m/04lbp", "Leather"]]
    write_csv(rel_of["oidv6-attributes-description.csv"], None, attrs)
    write_csv(rel_of["oidv6-relationships-description.csv"], None, [["at", "at"], ["on", "on"], ["is", "is"], ["holds", "holds"]])
    triplets = [[mids[i], mids[i + 1], rng.choice(["at", "on", "holds"])] for i in range(10)]
    write_csv(rel_of["oidv6-relationship-triplets.csv"], ["LabelName1", "LabelName2", "RelationshipLabel"], triplets)
    out.expected.update(attributes=4, relationship_descriptions=4, relationship_triplets=10)

    def pick_image(split: str) -> str:
        return rng.choice(all_images[split])

    # --- boxes: v6 train (21 columns), v5 validation/test (13) ---------------------------------------
    def box_row(split: str, wide: bool) -> list[str]:
        x = _coords(rng)
        r = [pick_image(split), rng.choice(["xclick", "activemil"]), rng.choice(boxable), "1", *x,
             *[str(rng.choice([0, 1, -1])) for _ in range(5)]]
        if wide:
            r += [f"{rng.random():.6f}" for _ in range(8)] if r[1] == "xclick" else ["-1"] * 8
        return r

    for rel, split, wide in (
        (rel_of["oidv6-train-annotations-bbox.csv"], "train", True),
        (rel_of["validation-annotations-bbox.csv"], "validation", False),
        (rel_of["test-annotations-bbox.csv"], "test", False),
    ):
        bad = [f"{pick_image(split)},xclick,{boxable[0]},1,not-a-number,0.5,0.1,0.2" + ",0" * (13 if wide else 5)]
        write_csv(rel, BOX_HEADER_V6 if wide else BOX_HEADER_V5, [box_row(split, wide) for _ in range(rows)], bad=bad)
        out.expected["boxes"] += rows

    # --- image-level labels: full human files, the -boxable subsets (repeating rows), machine ----------
    def labels(split: str, n: int, source: str = "verification") -> list[list[str]]:
        seen, res = set(), []
        while len(res) < n:
            r = [pick_image(split), source, rng.choice(mids), rng.choice(["0", "1"])]
            if (r[0], r[2]) not in seen:
                seen.add((r[0], r[2]))
                res.append(r)
        return res

    for split in ("train", "validation", "test"):
        full = labels(split, rows)
        vsplit = "val" if split == "validation" else split
        full_rel = rel_of.get(f"oidv7-{vsplit}-annotations-human-imagelabels.csv") or rel_of.get(
            f"oidv6-{split}-annotations-human-imagelabels.csv", f"v5/{split}-annotations-human-imagelabels.csv"
        )
        write_csv(full_rel, LABEL_HEADER, full, bad=["0123456789abcdef,verification"])
        # the subset: the full file's rows for boxable classes, plus a few the full file lacks
        subset = [r for r in full if r[2] in boxable]
        only_here = [[pick_image(split), "crowdsource-verification", boxable[-1], "1"] for _ in range(3)]
        only_here = [r for r in {tuple(r): r for r in only_here}.values() if tuple(r) not in {tuple(x) for x in full}]
        write_csv(rel_of[f"{split}-annotations-human-imagelabels-boxable.csv"], LABEL_HEADER, subset + only_here)
        out.expected["image_labels"] += len(full) + len(only_here)
    if "oidv7-train-annotations-machine-imagelabels.csv" in rel_of:
        machine = [[pick_image("train"), "machine", rng.choice(mids), f"{rng.uniform(0.5, 1):.2f}"] for _ in range(rows)]
        write_csv(rel_of["oidv7-train-annotations-machine-imagelabels.csv"], LABEL_HEADER, machine)
        out.expected["image_labels"] += rows

    # --- segmentations and their mask zips -------------------------------------------------------------
    masks: dict[str, list[str]] = {}
    for split in ("train", "validation", "test"):
        seg = []
        for _ in range(rows // 2):
            img, m, box = pick_image(split), rng.choice(segmentable), f"{rng.getrandbits(32):08x}"
            name = f"{img}_{m.replace('/', '')}_{box}.png"
            masks.setdefault(f"{split}-{img[0]}", []).append(name)
            clicks = ";".join(f"{rng.random():.5f} {rng.random():.5f} {rng.randint(0, 1)}" for _ in range(3))
            seg.append([name, img, m, box, *_coords(rng), f"{rng.random():.5f}", clicks])
        write_csv(rel_of[f"{split}-annotations-object-segmentation.csv"], SEG_HEADER, seg, bad=["x.png,0123456789abcdef"])
        out.expected["segmentations"] += len(seg)
    for f in RELEASES[release]:
        if f.relpath.endswith(".zip"):
            key = f.relpath.rsplit("/", 1)[-1].replace("-masks-", "-").removesuffix(".zip")
            p = root / f.relpath
            p.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(p, "w") as z:
                for name in masks.get(key, ()):
                    z.writestr(name, b"\x89PNG\r\n\x1a\n")

    # --- visual relationships --------------------------------------------------------------------------
    for split in ("train", "validation", "test"):
        vrd = [[pick_image(split), rng.choice(boxable), rng.choice(boxable), *_coords(rng), *_coords(rng),
                rng.choice(["at", "on", "holds", "is"])] for _ in range(rows // 2)]
        write_csv(rel_of[f"oidv6-{split}-annotations-vrd.csv"], VRD_HEADER, vrd)
        out.expected["relationships"] += len(vrd)

    # --- v7 point labels ('val' in the file names) -----------------------------------------------------
    if release == "v7":
        for vsplit in ("train", "val", "test"):
            split = _SPLIT_OF[vsplit]
            pts = []
            for _ in range(rows):
                yes, no, unsure = rng.randint(0, 3), rng.randint(0, 3), rng.randint(0, 1)
                est = "yes" if yes > no else "no" if no > yes else "unsure"
                pts.append([pick_image(split), f"{rng.random():.4f}", f"{rng.random():.4f}", rng.choice(mids), est,
                            rng.choice(["ih", "cgs", "vrs"]), str(yes), str(no), str(unsure),
                            rng.choice(["", "", "cat, dog", "thing"])])
            write_csv(rel_of[f"oidv7-{vsplit}-annotations-point-labels.csv"], POINT_HEADER, pts, bad=[f"{pick_image(split)},0.5"])
            out.expected["points"] += len(pts)

    if narratives:
        for rel in narrative_files("captions"):
            split = next(s for s in ("train", "validation", "test") if f"_{s}" in rel)
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            lines = []
            for k in range(rows // 4):
                lines.append(json.dumps({"dataset_id": "open_images", "image_id": pick_image(split),
                                         "annotator_id": k % 7, "caption": f"In this image, a cat, {k} dogs."}))
            lines.insert(len(lines) // 2, '{"image_id": "broken json"')
            bad_count += 1
            p.write_text("\n".join(lines) + "\n")
            out.expected["narratives"] += rows // 4
    out.malformed = bad_count
    return out


def narrative_files(which: str) -> tuple[str, ...]:
    """Paths (under the metadata directory) of the ``captions`` or ``full`` narratives files."""
    return tuple(f.relpath for f in NARRATIVES[which])
