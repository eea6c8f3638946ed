"""Scenario ``db-import``: ``oidl-engine db import`` against each database's own bulk loader.

On one generated boxes file of the real v6 train shape (21 columns, default 3M rows, about
153 bytes a row like the real 14.6M-row file), in one run:

* SQLite: the ``sqlite3`` CLI's ``.import --csv`` into a table of the same 21 typed columns,
  then the same two indexes (``image_id``, ``mid``) -- vs ``oidl-engine db import --only boxes``
  into a fresh SQLite file (its schema has 2 more columns: split, file_id).
* PostgreSQL (a throwaway server started for the run, tests/pg.py): ``psql \\copy`` into an
  UNLOGGED table plus the two indexes -- vs ``oidl-engine db import`` into a fresh database.

Rows/s include the index builds and, for ours, process start-up. Peak RSS is the import's
process tree. Then a class query on the full boxes table: images with a box of the most
frequent class (the worst case), ``COUNT(DISTINCT image_id)``.
Goals: ours >= 0.8x the loader's rows/s on both backends, peak RSS <= 300 MB, query < 1 s.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .measure import run_measured

REPO = Path(__file__).resolve().parents[1]
GOALS = {"ratio": 0.8, "peak_rss_mib": 300.0, "query_s": 1.0}
_COLS = (
    "image_id TEXT, source TEXT, mid TEXT, confidence REAL, x_min REAL, x_max REAL, y_min REAL, y_max REAL, "
    "is_occluded INTEGER, is_truncated INTEGER, is_group_of INTEGER, is_depiction INTEGER, is_inside INTEGER, "
    + ", ".join(f"xclick{i}x REAL" for i in range(1, 5)) + ", " + ", ".join(f"xclick{i}y REAL" for i in range(1, 5))
)


def _boxes_file(work: Path, rows: int, log: Callable[[str], None]) -> Path:
    from engine.meta.synthetic import write_boxes

    path = work / f"boxes-{rows}" / "v6" / "oidv6-train-annotations-bbox.csv"
    done = path.with_name(path.name + ".done")
    if not done.exists():
        log(f"  generating {rows:,} boxes rows ...")
        shutil.rmtree(path.parent.parent, ignore_errors=True)
        write_boxes(path, rows, seed=42)
        done.write_text(str(path.stat().st_size))
    return path


def _rate(rows: int, wall_s: float) -> float:
    return round(rows / wall_s) if wall_s > 0 else 0.0


def _engine_cmd(meta_dir: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "db", "import", "--meta-dir", str(meta_dir), "--db", target, "--only", "boxes"]


def _checked(r: Any, what: str) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr_tail[-600:]}")


def _sqlite(work: Path, csv_path: Path, rows: int, log: Callable[[str], None]) -> dict[str, Any]:
    cli = shutil.which("sqlite3")
    out: dict[str, Any] = {}
    if cli is None:
        out["reference_note"] = "sqlite3 CLI not installed (apt-get install sqlite3): no reference"
    else:
        ref_db = work / "ref.sqlite"
        ref_db.unlink(missing_ok=True)
        script = (
            f"PRAGMA journal_mode=OFF;\nPRAGMA synchronous=OFF;\nCREATE TABLE boxes ({_COLS});\n"
            f".import --csv --skip 1 {csv_path} boxes\n"
            "CREATE INDEX boxes_image_id_idx ON boxes (image_id);\nCREATE INDEX boxes_mid_idx ON boxes (mid);\n"
        )
        (work / "ref.sql").write_text(script)
        log("  sqlite3 .import --csv + 2 indexes ...")
        r = run_measured([cli, str(ref_db), f".read {work / 'ref.sql'}"], cwd=work)
        _checked(r, "sqlite3 .import")
        out["reference"] = {"tool": "sqlite3 .import --csv + 2 indexes", "wall_s": round(r.wall_s, 2),
                            "rows_per_s": _rate(rows, r.wall_s), "peak_rss_mib": round(r.tree.peak_rss_bytes / 2**20, 1),
                            "cpu_s": round(r.cpu_s, 2)}
        ref_db.unlink(missing_ok=True)
    db = work / "ours.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    log("  oidl-engine db import (SQLite) ...")
    r = run_measured(_engine_cmd(csv_path.parent.parent, str(db)), cwd=REPO)
    _checked(r, "oidl-engine db import (SQLite)")
    out["engine"] = {"wall_s": round(r.wall_s, 2), "rows_per_s": _rate(rows, r.wall_s),
                     "peak_rss_mib": round(r.tree.peak_rss_bytes / 2**20, 1), "cpu_s": round(r.cpu_s, 2)}
    conn = sqlite3.connect(db)
    n = conn.execute("SELECT COUNT(*) FROM boxes").fetchone()[0]
    if n != rows:
        raise RuntimeError(f"SQLite holds {n} boxes, the file {rows}")
    out["query"] = _class_query(lambda sql, p=(): conn.execute(sql, p).fetchall())
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    if "reference" in out:
        out["ratio"] = round(out["engine"]["rows_per_s"] / out["reference"]["rows_per_s"], 3)
        # on a shared machine wall time swings with the neighbours' load; CPU seconds much less
        # (both are one process doing all the work; pyarrow's parser threads count in ours)
        if out["engine"]["cpu_s"] > 0:
            out["cpu_ratio"] = round(out["reference"]["cpu_s"] / out["engine"]["cpu_s"], 3)
    return out


def _class_query(q: Callable[..., list]) -> dict[str, Any]:
    """Images with a box of the most frequent class (index on mid): the slowest class to ask for."""
    mid = q("SELECT mid FROM boxes GROUP BY mid ORDER BY COUNT(*) DESC LIMIT 1")[0][0]
    t0 = time.perf_counter()
    images = q("SELECT COUNT(DISTINCT image_id) FROM boxes WHERE mid = ?", (mid,))[0][0]
    dt = time.perf_counter() - t0
    return {"mid": mid, "images": images, "seconds": round(dt, 3)}


def _postgres(work: Path, csv_path: Path, rows: int, log: Callable[[str], None]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from pg import PostgresServer, find_bindir  # the test suite's throwaway server
    finally:
        sys.path.pop(0)
    bindir = find_bindir()
    if bindir is None:
        return {"skipped": "PostgreSQL binaries not found (apt-get install postgresql)"}
    try:
        import psycopg
    except ImportError:
        return {"skipped": "psycopg not installed (pip install -e '.[postgres]')"}
    out: dict[str, Any] = {}
    log("  starting a throwaway PostgreSQL ...")
    with PostgresServer(bindir) as pg:
        ref_url = pg.new_database("ref")
        # the file must be readable by psql (as root it reads it itself: \copy is client side)
        sql = (
            f"CREATE UNLOGGED TABLE boxes ({_COLS.replace('REAL', 'real').replace('INTEGER', 'integer')});\n"
            f"\\copy boxes FROM '{csv_path}' WITH (FORMAT csv, HEADER)\n"
            "CREATE INDEX boxes_image_id_idx ON boxes (image_id);\nCREATE INDEX boxes_mid_idx ON boxes (mid);\n"
        )
        (work / "ref-pg.sql").write_text(sql)
        psql = str(bindir / "psql") if (bindir / "psql").exists() else "psql"
        log("  psql \\copy into an unlogged table + 2 indexes ...")
        r = run_measured([psql, ref_url, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(work / "ref-pg.sql")], cwd=work)
        _checked(r, "psql \\copy")
        out["reference"] = {"tool": "psql \\copy (unlogged table) + 2 indexes", "wall_s": round(r.wall_s, 2),
                            "rows_per_s": _rate(rows, r.wall_s)}
        pg.psql("DROP DATABASE " + ref_url.rsplit("/", 1)[1])
        url = pg.new_database("ours")
        log("  oidl-engine db import (PostgreSQL) ...")
        r = run_measured(_engine_cmd(csv_path.parent.parent, url), cwd=REPO)
        _checked(r, "oidl-engine db import (PostgreSQL)")
        out["engine"] = {"wall_s": round(r.wall_s, 2), "rows_per_s": _rate(rows, r.wall_s),
                         "peak_rss_mib": round(r.tree.peak_rss_bytes / 2**20, 1), "cpu_s": round(r.cpu_s, 2)}
        with psycopg.connect(url) as conn:
            n = conn.execute("SELECT COUNT(*) FROM boxes").fetchone()[0]
            if n != rows:
                raise RuntimeError(f"PostgreSQL holds {n} boxes, the file {rows}")
            out["query"] = _class_query(lambda s, p=(): conn.execute(s.replace("?", "%s"), p).fetchall())
    out["ratio"] = round(out["engine"]["rows_per_s"] / out["reference"]["rows_per_s"], 3)
    return out


def scenario_db_import(work: Path, rows: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    csv_path = _boxes_file(work, rows, log)
    for f in (csv_path,):  # read once so neither side pays for the first read from disk
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    result: dict[str, Any] = {"rows": rows, "file_mib": round(csv_path.stat().st_size / 2**20, 1),
                              "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    result["sqlite"] = _sqlite(work, csv_path, rows, log)
    result["postgres"] = _postgres(work, csv_path, rows, log)
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def table(r: dict[str, Any]) -> str:
    lines = [
        f"db-import: {r['rows']:,} boxes rows ({r['file_mib']} MiB), one run",
        "",
        "| backend | reference | reference rows/s | oidl-engine rows/s | ratio (goal >= 0.8) | CPU ratio | peak RSS MiB (<= 300) | class query s (< 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("sqlite", "postgres"):
        b = r.get(name, {})
        if "skipped" in b:
            lines.append(f"| {name} | skipped: {b['skipped']} | | | | | | |")
            continue
        ref = b.get("reference", {})
        e = b.get("engine", {})
        q = b.get("query", {})
        lines.append(
            f"| {name} | {ref.get('tool', b.get('reference_note', ''))} | {ref.get('rows_per_s', '')} | {e.get('rows_per_s', '')} "
            f"| {b.get('ratio', '')} | {b.get('cpu_ratio', '')} | {e.get('peak_rss_mib', '')} | {q.get('seconds', '')} |"
        )
    return "\n".join(lines)
