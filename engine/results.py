"""``oidl-engine results``: images-success.csv and images-failure.csv from the state DB.

Both files use the input lists' own columns (what users of dnuffer's downloader know);
the failure file adds ``reason`` (the taxonomy value) and ``detail``. When the run's lists
have different columns, the header is the union in order of first appearance.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from . import state


def write_results(out: Path, db: Path | None, dest: Path | None) -> int:
    db_path = db or out / "oidl.sqlite"
    if not db_path.is_file():
        print(f"oidl-engine: no state database at {db_path}", file=sys.stderr)
        return 2
    dest = dest or out
    dest.mkdir(parents=True, exist_ok=True)
    conn = state.connect(db_path, readonly=True)
    try:
        lists = state.lists(conn)
        header: list[str] = []
        for _, (_, _, cols) in sorted(lists.items()):
            header.extend(c for c in cols if c not in header)
        index = {lid: [header.index(c) for c in cols] for lid, (_, _, cols) in lists.items()}
        counts = {}
        for status, name, extra in (("ok", "images-success.csv", []), ("failed", "images-failure.csv", ["reason", "detail"])):
            tmp = dest / f".{name}.tmp"
            n = 0
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(header + extra)
                for image_id, reason, detail, list_id, fields in state.iter_images(conn, status):
                    row = [""] * len(header)
                    values = json.loads(fields) if fields else []
                    positions = index.get(list_id, [])
                    for pos, value in zip(positions, values):
                        row[pos] = value
                    if not values and header:
                        row[0] = image_id
                    w.writerow(row + ([reason or "", detail or ""] if extra else []))
                    n += 1
            os.replace(tmp, dest / name)
            counts[name] = n
    finally:
        conn.close()
    for name, n in counts.items():
        print(f"{dest / name}: {n} rows")
    return 0
