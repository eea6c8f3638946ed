"""Issue 10 `oidl-engine export` end to end: `select` writes the list, `run` fetches it from a
loopback server, `export` labels the files, and every exported box is checked against the
pixels of the file it labels (a red and a blue rectangle found in the decoded output),
for every Rotation, with and without --apply-rotation, for shrink, fill-crop, pad and
kept originals; COCO through pycocotools (masks as RLE from the mask zips), YOLO and VOC
through their own files."""

from __future__ import annotations

import shutil
import sqlite3
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import pyvips

import oi_synth
from conftest import run_cli
from engine.loopback import LoopbackServer

yaml = pytest.importorskip("yaml")
coco_api = pytest.importorskip("pycocotools.coco")

RED, BLUE, CAR = "/m/01yrx", "/m/0bt9lr", "/m/0k4j"  # Cat, Dog, Car (never in any picture)
GREY = (128, 128, 128)
# (image_id, Rotation, stored width, height, red rect x0,y0,x1,y1, blue rect) in stored pixels
PICTURES = [
    ("a000000000000000", 0.0, 320, 240, (20, 30, 120, 100), (200, 150, 310, 230)),
    ("b000000000000001", 90.0, 320, 240, (10, 10, 90, 60), (150, 100, 300, 200)),
    ("c000000000000002", 180.0, 300, 200, (40, 20, 140, 180), (160, 60, 290, 110)),
    ("d000000000000003", 270.0, 240, 320, (30, 200, 200, 300), (5, 5, 60, 40)),
    ("e000000000000004", None, 200, 300, (50, 50, 150, 120), (20, 200, 180, 290)),
]
VARIANTS = ("96:png", "64x48:fill-crop:png", "80x80:pad:png", "40x60:fill-distort:png")


def picture(w: int, h: int, red: tuple, blue: tuple) -> np.ndarray:
    a = np.empty((h, w, 3), np.uint8)
    a[:] = GREY
    for (x0, y0, x1, y1), colour in ((red, (220, 30, 30)), (blue, (30, 30, 220))):
        a[y0:y1, x0:x1] = colour
    return a


def turned(a: np.ndarray, rotation: float | None) -> np.ndarray:
    """The image as annotators saw it: numpy's rot90 turns counterclockwise, as Rotation does."""
    return np.rot90(a, k=int(rotation or 0) // 90)


def found(a: np.ndarray, colour: str) -> tuple[float, float, float, float] | None:
    """Pixel box (x0, y0, x1, y1) of the red or blue pixels, edges at half intensity."""
    r, g, b = (a[..., i].astype(int) for i in range(3))
    m = (r > 174) & (g < 79) & (b < 79) if colour == "red" else (b > 174) & (g < 79) & (r < 79)
    ys, xs = np.nonzero(m)
    if len(xs) < 4:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def decode(path: Path) -> np.ndarray:
    img = pyvips.Image.new_from_file(str(path))
    return np.ndarray(buffer=img.write_to_memory(), dtype=np.uint8, shape=(img.height, img.width, img.bands))[..., :3]


def png(a: np.ndarray) -> bytes:
    h, w = a.shape[:2]
    bands = 1 if a.ndim == 2 else a.shape[2]
    return pyvips.Image.new_from_memory(np.ascontiguousarray(a).tobytes(), w, h, bands, "uchar").pngsave_buffer()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LoopbackServer, oi_synth.Dataset]]:
    """Served pictures and an annotations DB (with mask zips beside it) whose boxes are their truth."""
    root = tmp_path_factory.mktemp("export-release")
    served = root / "www"
    meta = root / "meta"
    (served / "img").mkdir(parents=True)
    meta.mkdir()
    with LoopbackServer(served) as server:
        ds = oi_synth.Dataset(classes=list(oi_synth.CLASSES), edges=list(oi_synth.EDGES))
        zips: dict[str, zipfile.ZipFile] = {}
        for i, (image_id, rot, w, h, red, blue) in enumerate(PICTURES):
            a = picture(w, h, red, blue)
            body = pyvips.Image.new_from_memory(a.tobytes(), w, h, 3, "uchar").jpegsave_buffer(Q=95, subsample_mode="off")
            (served / "img" / f"{image_id}.jpg").write_bytes(body)
            split = "train" if i % 2 == 0 else "validation"
            row = list(oi_synth.image_row(image_id, split, rot, f"{server.base_url}/img"))
            row[2] = f"{server.base_url}/img/{image_id}.jpg"
            row[8], row[9] = len(body), None  # OriginalSize checked, no MD5
            ds.images.append(tuple(row))
            seen = turned(a, rot)
            hh, ww = seen.shape[:2]
            for colour, mid, group_of in (("red", RED, 0), ("blue", BLUE, 1)):
                x0, y0, x1, y1 = found(seen, colour)
                ds.boxes.append(oi_synth.box_row(image_id, split, mid, x0 / ww, x1 / ww, y0 / hh, y1 / hh, group_of=group_of))
            # the red object's mask, at half the resolution the annotators saw (as the release's masks are)
            r = seen[..., 0].astype(int)
            mask = np.where((r > 174) & (seen[..., 1] < 79), 255, 0).astype(np.uint8)[::2, ::2]
            zip_rel = f"{split}-masks/{split}-masks-{image_id[0]}.zip"
            member = f"{image_id}_m01yrx_0000000{i}.png"
            if zip_rel not in zips:
                (meta / zip_rel).parent.mkdir(parents=True, exist_ok=True)
                zips[zip_rel] = zipfile.ZipFile(meta / zip_rel, "w")
            zips[zip_rel].writestr(member, png(np.ascontiguousarray(mask)))
            x0, y0, x1, y1 = found(seen, "red")
            ds.segmentations.append((image_id, split, RED, f"0000000{i}", member, zip_rel, x0 / ww, x1 / ww, y0 / hh,
                                     y1 / hh, 0.9, None))
        for z in zips.values():
            z.close()
        # a box of a class the export asks for but no picture shows, on an image never fetched
        ds.boxes.append(oi_synth.box_row("f000000000000009", "train", CAR, 0.1, 0.2, 0.1, 0.2))
        oi_synth.load_sqlite(meta / "openimages.sqlite", ds)
        yield meta, server, ds


@pytest.fixture(scope="module", params=["applied", "not-applied"])
def run_out(request, release, tmp_path_factory) -> tuple[Path, Path, bool]:  # noqa: ANN001
    meta, _, _ = release
    applied = request.param == "applied"
    work = tmp_path_factory.mktemp(f"export-{request.param}")
    lst = work / "list.csv"
    run_cli(["select", "--db", meta / "openimages.sqlite", "--class", "Cat", "--out", lst], check=True)
    out = work / "out"
    args = ["run", lst, "--out", out, "--procs", "1", "--ui", "none", "--max-retries", "0", "--save-originals"]
    for v in VARIANTS:
        args += ["--variant", v]
    if applied:
        args.append("--apply-rotation")
    run_cli(args, check=True, timeout_s=120)
    conn = sqlite3.connect(out / "oidl.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0] == len(PICTURES)
    assert conn.execute("SELECT value FROM meta WHERE key='apply_rotation'").fetchone()[0] == ("1" if applied else "0")
    conn.close()
    return meta, out, applied


def export(meta: Path, out: Path, fmt: str, variant: str, dest: Path, *extra: str, db: object = None) -> Path:
    """In-process (the CLI's own main): a subprocess per export would cost more than the export."""
    args = ["export", "--db", db or meta / "openimages.sqlite", "--meta-dir", meta, "--out", out, "--format", fmt,
            "--variant", variant, "--dest", dest, "--class", "Cat", "--class", "/m/0bt9lr", "--class", "Car", *extra]
    assert oi_synth.cli_main([str(a) for a in args]) == 0
    return dest


def export_fails(capsys, *args: object) -> tuple[int, str]:  # noqa: ANN001
    """Exit status and stderr of a failing export, in-process: an exception here is the traceback a user would see."""
    code = oi_synth.cli_main(["export", *map(str, args)])
    return code, capsys.readouterr().err


def variant_names() -> list[str]:
    return ["96-png", "64x48-fill-crop-png", "80-pad-png", "40x60-fill-distort-png", "original"]


def assert_close(got: tuple, want: tuple | None, what: str) -> None:
    assert want is not None, f"{what}: exported a box the file does not show"
    assert max(abs(g - w) for g, w in zip(got, want)) <= 1.0, f"{what}: {got} vs the pixels' {want}"


@pytest.mark.parametrize("variant", variant_names())
def test_coco_boxes_and_masks_match_the_pixels(run_out, variant, tmp_path) -> None:  # noqa: ANN001
    meta, out, applied = run_out
    dest = export(meta, out, "coco", variant, tmp_path / "coco")
    names = {"Cat": "red", "Dog": "blue"}
    seen_images = 0
    for split in ("train", "validation"):
        coco = coco_api.COCO(str(dest / "annotations" / f"instances_{split}.json"))
        cats = {c["id"]: c for c in coco.loadCats(coco.getCatIds())}
        assert [c["name"] for c in cats.values()] == ["Cat", "Dog", "Car"]
        assert cats[1]["supercategory"] == "Animal" and cats[3]["supercategory"] == "Vehicle"
        for img in coco.loadImgs(coco.getImgIds()):
            seen_images += 1
            path = dest / "images" / split / img["file_name"]
            assert path.is_symlink() and path.resolve().is_file()
            pixels = decode(path)
            assert pixels.shape[:2] == (img["height"], img["width"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            for name, colour in names.items():
                truth = found(pixels, colour)
                mine = [a for a in anns if cats[a["category_id"]]["name"] == name]
                if truth is None:  # cut away by fill-crop
                    assert not mine, (img, name)
                    continue
                assert len(mine) == 1, (img, name, anns)
                a = mine[0]
                x, y, w, h = a["bbox"]
                assert_close((x, y, x + w, y + h), truth, f"{img['oi_image_id']} {name} {variant} applied={applied}")
                assert a["iscrowd"] == (1 if name == "Dog" else 0)
                if name == "Cat":  # the mask, from the zip, in the file's geometry
                    m = coco.annToMask(a)
                    ys, xs = np.nonzero(m)
                    assert_close((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), truth, f"mask {img['oi_image_id']}")
                    assert abs(a["area"] - m.sum()) <= 1
                else:
                    assert "segmentation" not in a
    assert seen_images == len(PICTURES)


@pytest.mark.parametrize("variant", ["64x48-fill-crop-png", "96-png"])
def test_yolo_layout_and_boxes(run_out, variant, tmp_path) -> None:  # noqa: ANN001
    meta, out, _ = run_out
    dest = export(meta, out, "yolo", variant, tmp_path / "yolo")
    data = yaml.safe_load((dest / "data.yaml").read_text())
    assert data["names"] == {0: "Cat", 1: "Dog", 2: "Car"}
    assert data["train"] == "images/train" and data["val"] == "images/validation"
    n = 0
    for split in ("train", "validation"):
        for link in sorted((dest / "images" / split).iterdir()):
            n += 1
            pixels = decode(link.resolve())
            h, w = pixels.shape[:2]
            label = dest / "labels" / split / f"{link.stem}.txt"
            rows = [ln.split() for ln in label.read_text().splitlines()]
            for cls, colour in ((0, "red"), (1, "blue")):
                truth = found(pixels, colour)
                mine = [r for r in rows if int(r[0]) == cls]
                assert len(mine) == (truth is not None)
                if mine:
                    cx, cy, bw, bh = (float(v) for v in mine[0][1:])
                    box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
                    assert_close(box, truth, f"yolo {link.name}")
    assert n == len(PICTURES)


def test_voc_xml(run_out, tmp_path) -> None:  # noqa: ANN001
    meta, out, _ = run_out
    dest = export(meta, out, "voc", "80-pad-png", tmp_path / "voc")
    listed = sorted((dest / "ImageSets" / "Main" / "train.txt").read_text().split()
                    + (dest / "ImageSets" / "Main" / "validation.txt").read_text().split())
    assert listed == sorted(p[0] for p in PICTURES)
    for image_id in listed:
        root = ET.parse(dest / "Annotations" / f"{image_id}.xml").getroot()
        pixels = decode((dest / "JPEGImages" / root.findtext("filename")).resolve())
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (80, 80) == pixels.shape[1::-1]
        objs = {o.findtext("name"): o for o in root.iter("object")}
        assert set(objs) == {"Cat", "Dog"}
        for name, colour in (("Cat", "red"), ("Dog", "blue")):
            b = objs[name].find("bndbox")
            box = (int(b.findtext("xmin")) - 1, int(b.findtext("ymin")) - 1, int(b.findtext("xmax")), int(b.findtext("ymax")))
            assert_close(box, found(pixels, colour), f"voc {image_id} {name}")
        assert objs["Dog"].findtext("group_of") == "1"


def test_export_errors_are_clear(run_out, tmp_path, capsys) -> None:  # noqa: ANN001
    meta, out, applied = run_out
    db = meta / "openimages.sqlite"
    code, err = export_fails(capsys, "--db", db, "--out", out, "--format", "yolo", "--dest", tmp_path / "x")
    assert code == 2 and "--variant" in err  # several variants
    code, err = export_fails(capsys, "--db", db, "--out", out, "--format", "yolo", "--variant", "512", "--dest", tmp_path / "x")
    assert code == 2 and "96-png" in err
    code, err = export_fails(capsys, "--db", db, "--out", tmp_path, "--format", "coco", "--dest", tmp_path / "x")
    assert code == 2 and "no state DB" in err
    code, err = export_fails(capsys, "--db", db, "--out", out, "--format", "voc", "--variant", "96-png", "--class", "Catt")
    assert code == 2 and "did you mean 'Cat'?" in err
    assert not (tmp_path / "x").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    code, err = export_fails(capsys, "--db", db, "--out", out, "--format", "voc", "--variant", "96-png", "--dest", keep)
    assert code == 2 and "not an earlier export" in err and (keep / "precious.txt").exists()
    # an earlier export is replaced whole, never mixed with the new one
    again = tmp_path / "again"
    export(meta, out, "yolo", "96-png", again)
    (again / "labels" / "stale.txt").write_text("")
    export(meta, out, "yolo", "96-png", again)
    assert not (again / "labels" / "stale.txt").exists() and (again / "data.yaml").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build or old directory left
    if applied:
        return
    # a second run into the same OUT with the other --apply-rotation: the files' orientation is unknown
    lst = next(out.parent.glob("list.csv"))
    out = shutil.copytree(out, tmp_path / "out2")  # the other tests keep the fixture's OUT as it was
    run_cli(["run", lst, "--out", out, "--procs", "1", "--ui", "none", "--apply-rotation", "--variant", "96:png"], check=True)
    p = run_cli(["export", "--db", db, "--out", out, "--format", "coco", "--variant", "96-png", "--dest", tmp_path / "x"])
    assert p.returncode == 2 and "--apply-rotation" in p.stderr and "Traceback" not in p.stderr


def test_coco_from_postgresql_equals_sqlite(release, run_out, tmp_path, request) -> None:  # noqa: ANN001
    psycopg = pytest.importorskip("psycopg")
    meta, _, ds = release
    _, out, _ = run_out
    url = oi_synth.postgres_server(request).new_database("export")
    with psycopg.connect(url) as conn:
        oi_synth.load_postgres(conn, ds)
    for variant in ("64x48-fill-crop-png", "original"):
        a = export(meta, out, "coco", variant, tmp_path / f"lite-{variant}")
        b = export(meta, out, "coco", variant, tmp_path / f"pg-{variant}", db=url)
        for split in ("train", "validation"):
            ja = (a / "annotations" / f"instances_{split}.json").read_text()
            jb = (b / "annotations" / f"instances_{split}.json").read_text()
            assert ja == jb and '"segmentation"' in ja


@pytest.mark.parametrize("spec", ["256", "512:fill-crop:webp:q80", "224x224:fill-distort", "640x480:pad:q75:progressive",
                                  "300:subsample=off", "64:png", "100x50:fill-crop:jpeg:q91:subsample=on"])
def test_variant_names_read_back_as_their_spec(spec: str) -> None:
    """export finds a variant's mode from its directory name alone."""
    from engine.variants import parse_variant, spec_from_name

    v = parse_variant(spec)
    assert spec_from_name(v.name) == v
    for bad in ("", "fill-crop", "256-nope", "256-fill", "-256"):
        with pytest.raises(ValueError):
            spec_from_name(bad)
