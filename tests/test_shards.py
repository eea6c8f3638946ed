"""Issue 11: webdataset, TFRecord and parquet shards with the annotations inside, read back by
the formats' own readers (webdataset, TensorFlow, pyarrow, pandas, Hugging Face datasets),
and exactly once across a SIGKILL."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import pyvips

from annotations_db import db_annotations, make_db
from conftest import REPO, kill_tree_on_failure, run_cli, start_cli, wait_gone, write_list

TF_PYTHON = REPO / ".venv-tf" / "bin" / "python"  # scripts/test installs tensorflow-cpu there
N_ITEMS = 24  # 23 photos and one broken file (index 4)
VARIANTS = ("64", "original")
BASE = ["run", "--sizes", "64", "--save-originals", "--procs", "2", "--ui", "none", "--max-retries", "0"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory, corpus) -> tuple[Path, Path, dict]:
    """The annotations DB of the corpus, its metadata dir, and its rows per image (the reference)."""
    _, items = corpus
    d = tmp_path_factory.mktemp("meta")
    db = make_db(d, [i.image_id for i in items])
    return db, d, db_annotations(db, d)


def _run(tmp: Path, items, server, fmt: str, db: Path | None, *extra: str) -> Path:
    lst = write_list(tmp / "images.csv", items, server.base_url)
    out = tmp / "out"
    args = [*BASE, lst, "--out", out, "--format", fmt, "--shard-size", "7", *extra]
    if db is not None:
        args += ["--annotations", db]
    run_cli(args, check=True)
    return out


def _state(out: Path) -> tuple[dict, list, list]:
    conn = sqlite3.connect(out / "oidl.sqlite")
    try:
        rows = {i: s for i, s in conn.execute("SELECT image_id, status FROM images")}
        outputs = list(conn.execute("SELECT image_id, variant, path, bytes, width, height, shard_offset FROM outputs"))
        shards = list(conn.execute("SELECT path, variant, format, images, bytes FROM shards"))
    finally:
        conn.close()
    return rows, outputs, shards


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_") and k not in ("mask", "mask_png")}


def _canon(records: list[dict]) -> list[str]:
    return sorted(json.dumps(_strip(r), sort_keys=True) for r in records)


def assert_annotations_equal(got: dict, ref: dict | None) -> None:
    """``got``: a sample's annotations (lists of dicts); ``ref``: the DB's rows for that image."""
    ref = ref or {k: [] for k in ("boxes", "labels", "segmentations", "relationships", "points")}
    for kind in ("boxes", "labels", "segmentations", "relationships", "points"):
        assert _canon(got[kind]) == _canon(ref[kind]), kind


def assert_shard_files(out: Path, shards: list, ext: str) -> None:
    """The DB's shards are exactly the final files; each has its index; nothing temporary is left."""
    for variant in VARIANTS:
        names = sorted(p.name for p in (out / variant).glob(f"*.{ext}"))
        assert names == sorted(Path(p).name for p, v, *_ in shards if v == variant)
        for n in names:
            idx = json.loads((out / variant / f"_{n.split('.')[0]}.json").read_text())
            entry = next(s for s in shards if s[0] == f"{variant}/{n}")
            assert idx["images"] == entry[3] == len(idx["index"])
            assert idx["bytes"] == entry[4] == (out / variant / n).stat().st_size
    assert not list(out.rglob("*.part"))


# -- webdataset -------------------------------------------------------------------------------


def test_webdataset_shards_with_annotations(tmp_path: Path, corpus, server, meta) -> None:
    wds = pytest.importorskip("webdataset")
    _, items = corpus
    items = items[:N_ITEMS]
    db, _, ref = meta
    out = _run(tmp_path, items, server, "webdataset", db)
    rows, outputs, shards = _state(out)
    ok = {i for i, s in rows.items() if s == "ok"}
    assert len(ok) == N_ITEMS - 1
    assert_shard_files(out, shards, "tar")
    assert len([s for s in shards if s[1] == "64"]) == 4  # 23 images, 7 per shard
    for variant in VARIANTS:
        tars = sorted(str(p) for p in (out / variant).glob("*.tar"))
        # plain tar: GNU tar lists every member
        listed = subprocess.run(["tar", "-tf", tars[0]], capture_output=True, text=True, check=True).stdout.split()
        assert listed and all("/" not in m for m in listed)
        seen = Counter()
        for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
            key = sample["__key__"]
            seen[key] += 1
            doc = json.loads(sample["json"])
            assert doc["image_id"] == key and doc["variant"] == variant
            img = pyvips.Image.new_from_buffer(sample["jpg"], "")
            assert (img.width, img.height) == (doc["width"], doc["height"])
            if variant == "64":
                assert max(img.width, img.height) == 64
            assert doc["list"]["ImageID"] == key and doc["source_width"] and doc["rotation_applied"] is False
            assert_annotations_equal(doc["annotations"], ref.get(key))
            segs = (ref.get(key) or {}).get("segmentations", [])
            for n, seg in enumerate(doc["annotations"]["segmentations"]):
                want = next(r["_mask"] for r in segs if r["mask_path"] == seg["mask_path"])
                assert sample.get(f"mask_{n}.png") == want
        assert set(seen) == ok and set(seen.values()) == {1}, "every ok image exactly once per variant"
    # the state DB says where each image is: shard path + byte offset of its data
    for image_id, variant, path, nbytes, w, h, offset in outputs:
        with open(out / path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        with tarfile.open(out / path) as t:
            member = t.extractfile(f"{image_id}.jpg")
            assert member is not None and member.read() == data
    assert run_cli(["results", out]).returncode == 0
    assert len((out / "images-success.csv").read_text().splitlines()) == len(ok) + 1


def test_files_format_writes_annotation_json(tmp_path: Path, corpus, server, meta) -> None:
    _, items = corpus
    items = items[:6]
    db, _, ref = meta
    out = _run(tmp_path, items, server, "files", db)
    for it in items:
        if it.broken:
            continue
        for variant in VARIANTS:
            doc = json.loads((out / variant / it.image_id[:3] / f"{it.image_id}.json").read_text())
            assert (out / variant / it.image_id[:3] / f"{it.image_id}.jpg").is_file()
            assert_annotations_equal(doc["annotations"], ref.get(it.image_id))
            segs = (ref.get(it.image_id) or {}).get("segmentations", [])
            for seg in doc["annotations"]["segmentations"]:
                want = next(r["_mask"] for r in segs if r["mask_path"] == seg["mask_path"])
                assert (base64.b64decode(seg["mask_png"]) if seg["mask_png"] else None) == want


# -- TFRecord ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfrecord_run(tmp_path_factory: pytest.TempPathFactory, corpus, server, meta) -> Path:
    _, items = corpus
    return _run(tmp_path_factory.mktemp("tfr"), items[:N_ITEMS], server, "tfrecord", meta[0])


def _label_map(path: Path) -> dict[str, int]:
    from engine.sinks.tfrecord import read_label_map

    return {mid: idx for idx, mid, _ in read_label_map(path)}


def test_tfrecord_framing_and_examples(tfrecord_run: Path, meta) -> None:
    from engine.sinks.tfrecord import example_class, read_records

    out = tfrecord_run
    rows, _, shards = _state(out)
    assert_shard_files(out, shards, "tfrecord")
    labels = _label_map(out / "64" / "label_map.pbtxt")
    assert sorted(labels.values()) == list(range(1, len(labels) + 1))  # 0 is the OD API's background
    seen = Counter()
    for shard in sorted((out / "64").glob("*.tfrecord")):
        for rec in read_records(shard):  # both masked CRC32Cs of every record checked
            ex = example_class()()
            ex.ParseFromString(rec)
            f = ex.features.feature
            iid = f["image/source_id"].bytes_list.value[0].decode()
            seen[iid] += 1
            texts = [t.decode() for t in f["image/object/class/text"].bytes_list.value]
            assert list(f["image/object/class/label"].int64_list.value) == [labels[t] for t in texts]
    assert set(seen) == {i for i, s in rows.items() if s == "ok"} and set(seen.values()) == {1}
    # a flipped bit is caught
    shard = sorted((out / "64").glob("*.tfrecord"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    bad = shard.with_name("flipped.bin")
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_records(bad)
    bad.unlink()


def test_tfrecord_read_by_tensorflow(tfrecord_run: Path, meta) -> None:
    if not TF_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-tf is missing on CI: scripts/test must install tensorflow-cpu")
        pytest.skip(".venv-tf is missing: ./scripts/test creates it (tensorflow-cpu)")
    _, _, ref = meta
    out = tfrecord_run
    rows, _, _ = _state(out)
    shards = sorted(str(p) for v in VARIANTS for p in (out / v).glob("*.tfrecord"))
    # one TensorFlow process for every shard: importing TF is most of the cost
    p = subprocess.run([str(TF_PYTHON), str(REPO / "tests" / "tf_reader.py"), *shards], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-3000:]
    every = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    for variant in VARIANTS:
        labels = _label_map(out / variant / "label_map.pbtxt")
        examples = [e for e in every if Path(e["shard"]).parent.name == variant]
        ids = Counter(e["image/source_id"] for e in examples)
        assert set(ids) == {i for i, s in rows.items() if s == "ok"} and set(ids.values()) == {1}
        for e in examples:
            iid = e["image/source_id"]
            assert e["decoded_shape"][:2] == [e["image/height"], e["image/width"]]
            assert e["image/filename"] == f"{iid}.jpg" and e["image/format"] == "jpeg"
            want = (ref.get(iid) or {}).get("boxes", [])
            got = list(zip(e["image/object/class/text"], e["image/object/bbox/xmin"], e["image/object/bbox/xmax"],
                           e["image/object/bbox/ymin"], e["image/object/bbox/ymax"], e["image/object/group_of"],
                           e["image/object/occluded"], e["image/object/truncated"], e["image/object/depiction"]))
            exp = [(b["mid"], b["x_min"], b["x_max"], b["y_min"], b["y_max"], b["is_group_of"], b["is_occluded"],
                    b["is_truncated"], b["is_depiction"]) for b in want]
            assert len(got) == len(exp)
            for g, x in zip(sorted(got), sorted(exp)):
                assert g[0] == x[0] and g[5:] == x[5:]
                assert g[1:5] == pytest.approx(x[1:5], abs=1e-6)  # float32 in the Example
            assert e["image/object/class/label"] == [labels[t] for t in e["image/object/class/text"]]
            human = [lab for lab in (ref.get(iid) or {}).get("labels", []) if lab["kind"] == "human"]
            assert sorted(zip(e["image/class/text"], e["image/class/confidence"])) == sorted(
                (lab["mid"], lab["confidence"]) for lab in human)
            segs = (ref.get(iid) or {}).get("segmentations", [])
            assert e["mask_shapes"] == [[30, 40, 1] if s["_mask"] else None for s in segs]


# -- parquet ----------------------------------------------------------------------------------


def test_parquet_read_by_pyarrow_pandas_and_datasets(tmp_path: Path, corpus, server, meta) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    _, items = corpus
    db, _, ref = meta
    out = _run(tmp_path, items[:N_ITEMS], server, "parquet", db)
    rows, _, shards = _state(out)
    ok = {i for i, s in rows.items() if s == "ok"}
    assert_shard_files(out, shards, "parquet")
    files = sorted(str(p) for p in (out / "64").glob("*.parquet"))
    table = pq.ParquetDataset(files).read()
    assert Counter(table.column("image_id").to_pylist()) == Counter(ok)
    for r in table.to_pylist():
        img = pyvips.Image.new_from_buffer(r["image"], "")
        assert (img.width, img.height) == (r["width"], r["height"]) and r["format"] == "jpeg"
        assert r["ImageID"] == r["image_id"] and r["OriginalMD5"]
        assert_annotations_equal(r, ref.get(r["image_id"]))
        segs = (ref.get(r["image_id"]) or {}).get("segmentations", [])
        for seg in r["segmentations"]:
            assert seg["mask"] == next(s["_mask"] for s in segs if s["mask_path"] == seg["mask_path"])
    df = pq.read_table(files[0], columns=["image_id", "width", "boxes"]).to_pandas()
    assert len(df) == 7 and list(df.columns) == ["image_id", "width", "boxes"]
    pd = pytest.importorskip("pandas")
    whole = pd.read_parquet(out / "64", columns=["image_id", "boxes"])  # the directory: _NNNNN.json is skipped
    assert sorted(whole["image_id"]) == sorted(ok)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == len(ok)
    first = ds[0]
    assert_annotations_equal(first, ref.get(first["image_id"]))


# -- crash safety -----------------------------------------------------------------------------


def _tar_ids(path: Path) -> list[str]:
    """ImageIDs of a tar's samples; reading every member proves the archive complete."""
    ids = []
    with tarfile.open(path) as t:
        for m in t:
            data = t.extractfile(m).read()
            assert len(data) == m.size
            if m.name.endswith(".json"):
                ids.append(m.name.split(".", 1)[0])
    return ids


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_sigkill_mid_run_then_resume_exactly_once(tmp_path: Path, corpus, server, meta) -> None:
    _, items = corpus
    items = items[:40]
    db = meta[0]
    lst = write_list(tmp_path / "images.csv", items, server.base_url, rate="400000")
    out = tmp_path / "out"
    proc = start_cli([*BASE, "--transfers", "3", lst, "--out", out, "--format", "webdataset", "--shard-size", "4",
                      "--annotations", db])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            if len(list((out / "64").glob("*.tar"))) >= 2 and list((out / "64").glob("*.tar.part")):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no shard was completed in time")
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(children) == []
    finally:
        kill_tree_on_failure(proc)
    before = {p: _digest(p) for v in VARIANTS for p in (out / v).glob("*.tar")}
    for p in before:  # never a truncated shard under a final name
        _tar_ids(p)
    highest = max(int(p.name.split(".")[0]) for p in before)
    # resume with another shard size, served fast
    os.replace(write_list(tmp_path / "fast.csv", items, server.base_url), lst)
    run_cli([*BASE, lst, "--out", out, "--format", "webdataset", "--shard-size", "5", "--annotations", db], check=True)
    rows, outputs, shards = _state(out)
    ok = {i for i, s in rows.items() if s == "ok"}
    assert len(ok) == len(items) - sum(1 for i in items if i.broken)
    assert_shard_files(out, shards, "tar")
    for variant in VARIANTS:
        seen = Counter()
        for p in sorted((out / variant).glob("*.tar")):
            seen.update(_tar_ids(p))
            if p in before:
                assert _digest(p) == before[p], "a shard of the first run was rewritten"
            else:
                assert int(p.name.split(".")[0]) > highest, "a shard number was used twice"
        assert set(seen) == ok and set(seen.values()) == {1}, "every ok image in exactly one shard"
        assert {i for i, v, path, *_ in outputs if v == variant} == ok


def test_writer_killed_mid_shard_loses_nothing(tmp_path: Path, corpus, server, meta) -> None:
    """The writer's open shard dies with it: its rows are fetched again, into a new shard."""
    _, items = corpus
    items = items[:16]
    lst = write_list(tmp_path / "images.csv", items, server.base_url, rate="600000")
    out = tmp_path / "out"
    proc = start_cli([*BASE, "--transfers", "3", lst, "--out", out, "--format", "webdataset", "--shard-size", "6"])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not list((out / "64").glob("*.tar.part")):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(0.3)
        writer = [c.pid for c in psutil.Process(proc.pid).children() if Path(f"/proc/{c.pid}/comm").read_text().strip()
                  == "oidl-writer"]
        assert len(writer) == 1
        os.kill(writer[0], signal.SIGKILL)
        proc.wait(90)
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        assert "writer died" in err
    finally:
        kill_tree_on_failure(proc)
    rows, outputs, shards = _state(out)
    ok = {i for i, s in rows.items() if s == "ok"}
    assert len(ok) == len(items) - sum(1 for i in items if i.broken)
    assert_shard_files(out, shards, "tar")
    for variant in VARIANTS:
        seen = Counter()
        for p in (out / variant).glob("*.tar"):
            seen.update(_tar_ids(p))
        assert set(seen) == ok and set(seen.values()) == {1}


def test_recover_publishes_committed_parts_and_drops_the_rest(tmp_path: Path) -> None:
    """A crash between the commit and the renames: the next start rolls forward, never back."""
    from engine import state
    from engine.sinks.base import Sample
    from engine.sinks.shards import recover
    from engine.sinks.webdataset import TarShard

    out = tmp_path / "out"
    (out / "64").mkdir(parents=True)
    for n in (3, 4):
        w = TarShard(out / "64" / f"0000{n}.tar.part")
        w.add(Sample(f"img{n}", "64", "jpg", [b"\xff\xd8data"], 6, 1, 1, {"image_id": f"img{n}"}))
        w.finish()
        (out / "64" / f"_0000{n}.json.part").write_text("{}")
    (out / "64" / "00001.tar").write_bytes(b"")  # an older, published shard
    state.init(out / "oidl.sqlite")
    conn = state.connect(out / "oidl.sqlite")
    from engine.sinks.shards import ShardRecord

    state.write_batch(conn, [], [ShardRecord("64/00003.tar", "64", "webdataset", 1, 0)])
    assert recover(out, state.shard_paths(conn)) == 5
    conn.close()
    assert sorted(p.name for p in (out / "64").iterdir()) == ["00001.tar", "00003.tar", "_00003.json"]
    assert _tar_ids(out / "64" / "00003.tar") == ["img3"]


def test_bad_format_options_are_clear_errors(tmp_path: Path) -> None:
    lst = tmp_path / "x.csv"
    lst.write_text("ImageID\n")
    p = run_cli(["run", lst, "--out", tmp_path / "o", "--format", "webdataset", "--annotations", tmp_path / "nope.db"])
    assert p.returncode == 2 and "Traceback" not in p.stderr and "nope.db" in p.stderr
    p = run_cli(["run", lst, "--out", tmp_path / "o", "--format", "zip"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = run_cli(["run", lst, "--out", tmp_path / "o", "--format", "tfrecord", "--shard-bytes", "lots"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
