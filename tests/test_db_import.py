"""``oidl-engine db import`` into SQLite and a real PostgreSQL server (tests/pg.py).

Real V3 samples (first 1,000 rows of each real 2017_11 CSV) extracted in the release layout,
and a generated v7 release downloaded over loopback with ``oidl-engine metadata``.
"""

from __future__ import annotations

import csv
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli, start_cli
from engine.loopback import LoopbackServer
from engine.meta.db import connect
from engine.meta.download import extract
from engine.meta.synthetic import write_boxes, write_release

SAMPLES = REPO / "tests" / "data" / "openimages-samples"
TABLES = ("images", "image_labels", "boxes", "segmentations", "relationships", "points", "narratives", "classes",
          "class_edges", "attributes", "relationship_descriptions", "relationship_triplets")


def counts(target: str | Path) -> dict[str, int]:
    with connect(target) as db:
        return {t: db.query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in TABLES}


def csv_rows(path: Path, *, header: bool = True) -> int:
    with path.open(newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.reader(f)) - (1 if header else 0)


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v3")
    archives = tmp_path_factory.mktemp("v3-archives")  # extract() leaves a marker beside the archive
    for archive in sorted(SAMPLES.glob("*.tar.gz")):
        copy = archives / archive.name
        copy.write_bytes(archive.read_bytes())
        extract(copy, root)
    return root


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "oi.sqlite")
    return request.getfixturevalue("postgres").new_database()


def test_real_v3_samples_give_the_files_row_counts_twice(v3_dir: Path, target: str) -> None:
    r = run_cli(["db", "import", "--meta-dir", v3_dir, "--db", target], check=True)
    assert "0 malformed" in r.stdout
    d = v3_dir / "2017_11"
    splits = ("train", "validation", "test")
    want = {
        "images": sum(csv_rows(d / s / "images.csv") for s in splits),
        "image_labels": sum(csv_rows(d / s / f"annotations-{k}.csv") for s in splits for k in ("human", "machine")),
        "boxes": sum(csv_rows(d / s / "annotations-human-bbox.csv") for s in splits),
        "classes": csv_rows(d / "class-descriptions.csv", header=False),
    }
    got = counts(target)
    for table, n in want.items():
        assert got[table] == n, (table, got[table], n)
    with connect(target) as db:
        # header-less class descriptions; flags from the 2017_11 class lists
        assert db.query("SELECT SUM(boxable), SUM(trainable), COUNT(segmentable) FROM classes")[0] == (
            csv_rows(d / "classes-bbox.txt", header=False), csv_rows(d / "classes-trainable.txt", header=False), 0)
        # 8-column train boxes: the flags a v3 train file lacks are NULL, not 0
        assert db.query("SELECT COUNT(*), COUNT(is_occluded) FROM boxes WHERE split = 'train'")[0] == (1000, 0)
        assert db.query("SELECT COUNT(*) FROM boxes WHERE split = 'validation' AND is_occluded IS NOT NULL")[0][0] == 1000
        assert db.query("SELECT COUNT(*) FROM images WHERE rotation IS NOT NULL")[0][0] == 0
        assert db.query("SELECT kind, COUNT(*) FROM image_labels GROUP BY kind ORDER BY kind") == [("human", 3000), ("machine", 3000)]
        row = db.query("SELECT author, original_size FROM images WHERE image_id = ?", ("000002b97e5471a0",))
        assert row == [("Daniel X. O&#x27;Neil", 7054258)]
    again = run_cli(["db", "import", "--meta-dir", v3_dir, "--db", target, "--force"], check=True)
    assert counts(target) == got, again.stdout


@pytest.fixture(scope="module")
def v7_site(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    served = tmp_path_factory.mktemp("served")
    release = write_release(served, release="v7", rows=200, seed=3)
    with LoopbackServer(served) as server:
        yield server, release


@pytest.fixture(scope="module")
def v7_dir(v7_site, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    server, _ = v7_site
    dest = tmp_path_factory.mktemp("v7")
    run_cli(
        ["metadata", "--release", "v7", "--dir", dest, "--base-url", server.base_url + "/", "--narratives", "captions",
         "--narratives-base-url", server.base_url + "/localized-narratives/"],
        check=True,
    )
    return dest


def test_generated_v7_release_downloaded_then_imported_twice(v7_site, v7_dir: Path, target: str) -> None:  # noqa: ANN001
    _, release = v7_site
    r = run_cli(["db", "import", "--meta-dir", v7_dir, "--db", target], check=True)
    assert f"{release.malformed} malformed row(s) skipped" in r.stdout, r.stdout
    # every malformed row is reported with its file and line
    assert "v5/validation-annotations-bbox.csv:" in r.stdout and "row skipped" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    got = counts(target)
    for table, n in release.expected.items():
        assert got[table] == n, (table, got[table], n)
    with connect(target) as db:
        assert db.query("SELECT name FROM classes WHERE name LIKE 'Ducks%'") == [("Ducks, geese and swans",)]
        assert db.query("SELECT COUNT(*) FROM class_edges WHERE relation = 'part'")[0][0] == 5
        flags = db.query("SELECT SUM(boxable), SUM(trainable), SUM(segmentable) FROM classes")[0]
        assert tuple(int(x) for x in flags) == (40, 45, 20)
        # v7 point labels: 'val' in the file name is the validation split; ImageId column
        assert db.query("SELECT COUNT(*) FROM points WHERE split = 'validation'")[0][0] == 200
        zips = db.query("SELECT image_id, mask_zip FROM segmentations WHERE split = 'train' LIMIT 5")
        assert all(z == f"v5/train-masks/train-masks-{i[0]}.zip" and (v7_dir / z).is_file() for i, z in zips)
        # one row per image: the boxable train list and the v6 train list overlap
        assert db.query("SELECT COUNT(*), COUNT(DISTINCT image_id) FROM images")[0] == (release.expected["images"],) * 2
    r2 = run_cli(["db", "import", "--meta-dir", v7_dir, "--db", target], check=True)
    assert "0 file(s) imported" in r2.stdout and counts(target) == got
    r3 = run_cli(["db", "import", "--meta-dir", v7_dir, "--db", target, "--force"], check=True)
    assert counts(target) == got, r3.stdout


def test_changed_file_is_replaced_and_only_filters(v7_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "meta"
    shutil.copytree(v7_dir, d)
    db = tmp_path / "oi.sqlite"
    run_cli(["db", "import", "--meta-dir", d, "--db", db, "--only", "boxes"], check=True)
    before = counts(db)
    assert before["boxes"] > 0 and before["images"] == 0 and before["image_labels"] == 0
    f = d / "v5/test-annotations-bbox.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-10]) + "\n")  # 10 rows fewer
    r = run_cli(["db", "import", "--meta-dir", d, "--db", db, "--only", "boxes"], check=True)
    assert "1 file(s) imported" in r.stdout
    assert counts(db)["boxes"] == before["boxes"] - 10


def test_superseded_release_file_gives_way(tmp_path: Path) -> None:
    d = tmp_path / "meta"
    old = d / "2018_04/validation/validation-annotations-bbox.csv"
    new = d / "v5/validation-annotations-bbox.csv"
    head = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
    old.parent.mkdir(parents=True)
    old.write_text(head + "0001eeaf4aed83f9,xclick,/m/0cmf2,1,0.1,0.9,0.1,0.8,0,0,0,0,0\n" * 3)
    db = tmp_path / "oi.sqlite"
    run_cli(["db", "import", "--meta-dir", d, "--db", db], check=True)
    assert counts(db)["boxes"] == 3
    new.parent.mkdir(parents=True)
    new.write_text(head + "0001eeaf4aed83f9,xclick,/m/0cmf2,1,0.1,0.9,0.1,0.8,0,0,0,0,0\n" * 2)
    r = run_cli(["db", "import", "--meta-dir", d, "--db", db], check=True)
    assert "superseded by v5/validation-annotations-bbox.csv" in r.stdout
    assert counts(db)["boxes"] == 2


def test_nothing_to_import_and_bad_targets_are_clear(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hello")
    r = run_cli(["db", "import", "--meta-dir", tmp_path])
    assert r.returncode == 2 and "no Open Images metadata files" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["db", "import", "--meta-dir", tmp_path / "missing"])
    assert r.returncode == 2 and "not a directory" in r.stderr
    (tmp_path / "classes.txt").write_text("/m/01\n")
    r = run_cli(["db", "import", "--meta-dir", tmp_path, "--db", "postgresql://nobody@127.0.0.1:1/x"])
    assert r.returncode == 1 and "cannot connect" in r.stderr and "Traceback" not in r.stderr


def test_missing_psycopg_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("/m/01\n")
    code = (
        "import sys; sys.modules['psycopg'] = None; from engine.cli import main; "
        f"sys.exit(main(['db', 'import', '--meta-dir', {str(tmp_path)!r}, '--db', 'postgresql://u@127.0.0.1/x']))"
    )
    p = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and "pip install 'oidl-engine[postgres]'" in p.stderr, p.stderr


KILL_ROWS = 250_000  # a few seconds of loading: time to be killed mid-file


@pytest.fixture(scope="module")
def big_boxes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "oidv6-train-annotations-bbox.csv"
    write_boxes(path, KILL_ROWS, seed=5)
    return path


@pytest.mark.timeout(240)
def test_sigkill_mid_file_leaves_the_last_complete_state(target: str, tmp_path: Path, big_boxes: Path) -> None:
    d = tmp_path / "meta"
    (d / "v7").mkdir(parents=True)
    (d / "v6").mkdir(parents=True)
    (d / "v7/oidv7-classes-trainable.txt").write_text("/m/01\n/m/02\n")
    (d / "v6" / big_boxes.name).symlink_to(big_boxes)
    rows = KILL_ROWS
    proc = start_cli(["db", "import", "--meta-dir", d, "--db", target])
    try:
        # the class list is committed first; kill while the boxes file is loading
        deadline = time.monotonic() + 60
        seen = ""
        while "oidv7-classes-trainable.txt" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        assert "imported v7/oidv7-classes-trainable.txt" in seen
        time.sleep(0.5)
        assert proc.poll() is None, "the import finished before it could be interrupted: make the file larger"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with connect(target) as db:
        assert db.query("SELECT COUNT(*) FROM boxes")[0][0] == 0
        assert db.query("SELECT path FROM imports") == [("v7/oidv7-classes-trainable.txt",)]
        assert db.query("SELECT COUNT(*) FROM classes")[0][0] == 2
        if db.backend == "sqlite":
            assert db.query("PRAGMA integrity_check") == [("ok",)]
    r = run_cli(["db", "import", "--meta-dir", d, "--db", target], check=True, timeout_s=200)
    assert "1 unchanged" in r.stdout
    assert counts(target)["boxes"] == rows
    if not target.startswith("postgresql"):
        assert sqlite3.connect(target).execute("SELECT COUNT(*) FROM imports").fetchone()[0] == 2


@pytest.mark.timeout(300)
def test_bench_db_import_smoke(tmp_path: Path) -> None:
    """The bench scenario end to end on a small file: both loaders, both backends, the query."""
    import json
    import shutil as _shutil

    from pg import find_bindir

    if _shutil.which("sqlite3") is None or find_bindir() is None:
        pytest.skip("needs the sqlite3 CLI and PostgreSQL (scripts/test installs both)")
    out = tmp_path / "r.json"
    p = subprocess.run(
        [__import__("sys").executable, "-m", "bench", "run", "--scenario", "db-import", "--db-rows", "20000",
         "--work-dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    for backend in ("sqlite", "postgres"):
        b = r[backend]
        assert b["reference"]["rows_per_s"] > 0 and b["engine"]["rows_per_s"] > 0 and b["ratio"] > 0
        assert b["query"]["images"] > 0
