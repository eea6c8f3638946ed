"""``oidl-engine db import``: every Open Images metadata file under a directory into the database.

Discovery: each file under ``--meta-dir`` is recognised by its name (the names ``oidl-engine
metadata`` writes for releases v1-v7, and the Localized Narratives), which gives its table,
split and *slot*. Files in one slot are versions of the same data (the 2018_04 and the v6 train
boxes): only the newest release's file is loaded, so a directory holding several releases
never doubles a row. Image lists and class descriptions are merged instead (one row per image
or class; a later list fills in what an earlier one left NULL).

Loading: CSVs are parsed by pyarrow's streaming reader (C, a block at a time: bounded memory),
validated column by column (a malformed row is reported with its line and skipped), and
written with ``executemany`` (SQLite) or ``COPY ... FROM STDIN`` (PostgreSQL). Each file is
one transaction that also records it in ``imports``: an interrupted import leaves every file
either wholly loaded or absent, and a re-run skips unchanged files and replaces changed ones
(their rows are tagged with ``file_id``). Indexes are built once, after the load.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.meta import schema
from engine.meta.db import Database, DatabaseError, connect, describe, is_postgres
from engine.meta.download import _eta

#: what ``--only`` accepts
KINDS = ("classes", "images", "labels", "boxes", "segmentations", "relationships", "points", "narratives")

#: header name (lower case) -> column, per table; a file's other columns are ignored
_HEADER_MAP: dict[str, dict[str, str]] = {
    "images": {
        "imageid": "image_id", "subset": "split", "originalurl": "original_url",
        "originallandingurl": "original_landing_url", "license": "license", "authorprofileurl": "author_profile_url",
        "author": "author", "title": "title", "originalsize": "original_size", "originalmd5": "original_md5",
        "thumbnail300kurl": "thumbnail_300k_url", "rotation": "rotation",
    },
    "image_labels": {"imageid": "image_id", "source": "source", "labelname": "mid", "confidence": "confidence"},
    "boxes": {
        "imageid": "image_id", "source": "source", "labelname": "mid", "confidence": "confidence",
        "xmin": "x_min", "xmax": "x_max", "ymin": "y_min", "ymax": "y_max", "isoccluded": "is_occluded",
        "istruncated": "is_truncated", "isgroupof": "is_group_of", "isdepiction": "is_depiction",
        "isinside": "is_inside", **{f"xclick{i}{a}": f"xclick{i}{a}" for i in range(1, 5) for a in "xy"},
    },
    "segmentations": {
        "maskpath": "mask_path", "imageid": "image_id", "labelname": "mid", "boxid": "box_id",
        "boxxmin": "box_x_min", "boxxmax": "box_x_max", "boxymin": "box_y_min", "boxymax": "box_y_max",
        "predictediou": "predicted_iou", "clicks": "clicks",
    },
    "relationships": {
        "imageid": "image_id", "labelname1": "mid1", "labelname2": "mid2", "relationshiplabel": "relationship",
        **{f"{c}{k}": f"{c[0]}_{c[1:]}{k}" for c in ("xmin", "xmax", "ymin", "ymax") for k in "12"},
    },
    "points": {
        "imageid": "image_id", "x": "x", "y": "y", "label": "mid", "labelname": "mid",
        "estimatedyesno": "estimated_yes_no", "source": "source", "yesvotes": "yes_votes", "novotes": "no_votes",
        "unsurevotes": "unsure_votes", "textlabel": "text_label",
    },
}
#: releases in order; a file's rank is the release its path names (newest wins a slot)
_RANKS = (("2016_08", 1), ("2017_07", 2), ("2017_11", 3), ("2018_04", 4), ("v5", 5), ("v6", 6), ("v7", 7),
          ("localized-narratives", 6), ("challenge", 4))
_SPLIT_RE = re.compile(r"(?:^|[-_/])(train|validation|val|test)(?=[-_./]|$)")
_MAX_REPORTED = 10  # malformed rows printed per file; the rest are only counted


@dataclass(frozen=True)
class Source:
    """One recognised metadata file."""

    path: Path
    relpath: str
    kind: str  # one of KINDS
    table: str  # target table ('classes' files may fill class_lists too)
    fmt: str  # csv | names (class descriptions) | list (one MID a line) | hierarchy | jsonl
    split: str | None
    slot: str | None  # None: merged (images, class names), never superseded
    rank: int
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def order(self) -> tuple:
        # classes first (flags), images, then annotations; a -boxable label subset after the
        # full files it is de-duplicated against; older releases first so newer names win
        return (KINDS.index(self.kind), self.extra.get("after", 0), self.rank, self.relpath)


def _rank(relpath: str) -> int:
    best = 0
    for key, r in _RANKS:
        if key in relpath:
            best = max(best, r)
    return best


def _split(relpath: str) -> str | None:
    m = _SPLIT_RE.findall(relpath.rsplit("/", 1)[-1]) or _SPLIT_RE.findall(relpath)
    if not m:
        return None
    s = m[-1]
    return "validation" if s == "val" else s


def classify(path: Path, root: Path) -> Source | None:
    """What ``path`` holds, from its name; None for files we do not import."""
    rel = path.relative_to(root).as_posix()
    name = path.name.lower()
    rank, split = _rank(rel), _split(rel)

    def src(kind: str, table: str, fmt: str, slot: str | None, **extra: object) -> Source:
        return Source(path, rel, kind, table, fmt, split, slot, rank, dict(extra))

    if name.endswith(".jsonl"):
        if "_captions" in name:
            return src("narratives", "narratives", "jsonl", f"narratives:{split}", variant=1)
        if "localized_narratives" in name:
            return src("narratives", "narratives", "jsonl", f"narratives:{split}", variant=2)
        return None
    if name.endswith(".json"):
        return src("classes", "class_edges", "hierarchy", "hierarchy") if "hierarchy" in name else None
    if name.endswith(".txt"):
        if not name.startswith(("classes", "oidv6-classes", "oidv7-classes")):
            return None
        if "bbox-trainable" in name:
            lst = "bbox_trainable"
        elif "bbox" in name or "boxable" in name:
            lst = "boxable"
        elif "segmentation" in name:
            lst = "segmentable"
        elif "trainable" in name:
            lst = "trainable"
        else:
            lst = "all"
        return src("classes", "class_lists", "list", f"list:{lst}", list=lst)
    if not name.endswith(".csv"):
        return None
    if "class-descriptions" in name or name == "dict.csv":
        return src("classes", "classes", "names", None, list="boxable" if "boxable" in name else None)
    if "attributes-description" in name:
        return src("classes", "attributes", "pairs", "attributes")
    if "relationships-description" in name:
        return src("classes", "relationship_descriptions", "pairs", "relationship_descriptions")
    if "relationship-triplets" in name:
        return src("classes", "relationship_triplets", "csv", "relationship_triplets")
    if "point-labels" in name:
        return src("points", "points", "csv", f"points:{split}")
    if "vrd" in name:
        return src("relationships", "relationships", "csv", f"relationships:{split}")
    if "object-segmentation" in name:
        return src("segmentations", "segmentations", "csv", f"segmentations:{split}")
    if "bbox" in name:
        return src("boxes", "boxes", "csv", f"boxes:{split}")
    if "imagelabels" in name or name in ("annotations-human.csv", "annotations-machine.csv", "labels.csv"):
        machine = "machine" in rel.lower()
        kind = "machine" if machine else "human"
        subset = "boxable" in name
        return src(
            "labels", "image_labels", "csv", f"labels:{kind}:{'boxable' if subset else 'full'}:{split}",
            label_kind=kind, boxable=subset, after=1 if subset else 0,
        )
    if "images" in name or name == "image_ids_and_rotation.csv":
        return src("images", "images", "csv", None)
    return None


def discover(root: Path, only: set[str] | None = None) -> tuple[list[Source], list[tuple[Source, Source]], list[str]]:
    """(files to load in order, (superseded, by) pairs, unrecognised data-like files)."""
    found: list[Source] = []
    unknown: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or fn.endswith((".part", ".part.json", ".oidl-verified", ".oidl-extracted", ".tmp")):
                continue
            p = Path(dirpath) / fn
            if p.suffix in (".sqlite", ".db") or fn.endswith(("-wal", "-shm", "-journal")):
                continue
            s = classify(p, root)
            if s is None:
                if p.suffix in (".csv", ".json", ".jsonl", ".txt"):
                    unknown.append(p.relative_to(root).as_posix())
                continue
            if only is None or s.kind in only:
                found.append(s)
    # per slot, the newest release wins (and within it the richest variant: full narratives
    # with traces over captions only); every file at that level is loaded (narrative shards)
    best: dict[str, tuple[int, int]] = {}
    for s in found:
        if s.slot is not None:
            key = (s.rank, s.extra.get("variant", 0))
            best[s.slot] = max(best.get(s.slot, key), key)
    keep, dropped = [], []
    for s in found:
        if s.slot is not None and (s.rank, s.extra.get("variant", 0)) != best[s.slot]:
            winner = next(w for w in found if w.slot == s.slot and (w.rank, w.extra.get("variant", 0)) == best[s.slot])
            dropped.append((s, winner))
        else:
            keep.append(s)
    keep.sort(key=lambda s: s.order)
    return keep, dropped, unknown


# ------------------------------------------------------------------------------------------
# Reading: batches of pyarrow arrays in the target table's column order
# ------------------------------------------------------------------------------------------

_NUM_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|NaN|inf)$"  # what a cast accepts
_INT_RE = r"^[+-]?\d+(\.0*)?$"


class Malformed:
    """Counts and reports the bad rows of one file (the first few with file and line)."""

    def __init__(self, relpath: str, out: Callable[[str], None]) -> None:
        self.relpath = relpath
        self.count = 0
        self.out = out

    def __call__(self, line: int | None, why: str) -> None:
        self.count += 1
        if self.count <= _MAX_REPORTED:
            where = f"{self.relpath}:{line}" if line else self.relpath
            self.out(f"warning: {where}: {why}; row skipped")
        elif self.count == _MAX_REPORTED + 1:
            self.out(f"warning: {self.relpath}: more malformed rows; only counting them from here")


class _LineFinder:
    """Finds the line numbers of rows the CSV parser refused (their text), reading forward.

    pyarrow's streaming reader does not know line numbers; bad rows are rare, so a second,
    forward-only pass over the file locates each one by its text, only when there is one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: io.TextIOWrapper | None = None
        self.line = 0

    def find(self, text: str) -> int | None:
        if self.f is None:
            self.f = self.path.open("r", encoding="utf-8", errors="replace", newline="")
        for raw in self.f:
            self.line += 1
            if raw.rstrip("\r\n") == text:
                return self.line
        return None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _sniff_header(path: Path) -> list[str]:
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as f:
        first = f.readline()
    return next(csv.reader([first]), [])


@dataclass
class Progress:
    """Rows and bytes of the current file; rendered by :class:`_Display`."""

    done_bytes: int = 0
    rows: int = 0


def read_csv_batches(
    src: Source, columns: list[tuple[str, str]], consts: dict[str, object], bad: Malformed, progress: Progress
) -> Iterator:
    """pyarrow RecordBatches with exactly ``columns`` (name, logical type) of ``src``'s table."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    header = [h.strip() for h in _sniff_header(src.path)]
    mapping = _HEADER_MAP[src.table]
    file_cols = [mapping.get(h.lower().replace("_", "")) or f"_ignored_{i}" for i, h in enumerate(header)]
    if "image_id" not in file_cols:
        raise ImportFailure(f"{src.relpath}: no ImageID column in its header ({', '.join(header[:6])}...)")
    n_header = 1
    finder = _LineFinder(src.path)
    refused: list[int] = []  # line numbers of rows the parser refused, ascending

    def on_invalid(row: object) -> str:
        line = finder.find(row.text)  # type: ignore[attr-defined]
        if line is not None:
            refused.append(line)
        bad(line, f"{row.actual_columns} columns, expected {row.expected_columns}")  # type: ignore[attr-defined]
        return "skip"

    def line_of(valid_index: int) -> int:
        """Line of the valid_index-th (0-based) row the parser accepted."""
        line = valid_index + 1 + n_header
        for r in refused:
            if r <= line:
                line += 1
        return line

    types = dict(columns)
    present = [c for c in file_cols if c in types]
    # the batch holds the file's columns and the computed ones; constants are the writer's
    columns_from_file_or_computed = [
        c for c, _ in columns if c in present or (c in consts and callable(consts[c]))
    ]
    row_bytes = _bytes_per_row(src.path)  # for progress: pyarrow reads ahead of what it parsed
    f = src.path.open("rb")
    try:
        reader = pcsv.open_csv(
            f,
            read_options=pcsv.ReadOptions(block_size=1 << 20,  # 1 MB: ~7k rows of Python objects at a time
                                          column_names=file_cols, skip_rows=n_header, encoding="utf8"),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in file_cols}, include_columns=present, strings_can_be_null=True,
                null_values=[""],  # not pyarrow's default list: a title may well be "NA"
            ),
        )
        accepted = 0
        for batch in reader:
            n = batch.num_rows
            if n == 0:
                continue
            arrays = dict(zip(batch.schema.names, batch.columns))
            converted = _convert(arrays, types)
            if converted is None:  # a bad value somewhere in this block: find the rows, drop them
                ok = _valid_rows(arrays, types)
                bad_idx = pc.indices_nonzero(pc.invert(ok)).to_pylist()
                for i in bad_idx:
                    bad(line_of(accepted + i), "a value that is not a number where one belongs, or no ImageID")
                arrays = {k: pc.filter(v, ok) for k, v in arrays.items()}
                n -= len(bad_idx)
                converted = _convert(arrays, types)
                if converted is None:
                    raise ImportFailure(f"{src.relpath}: values near line {line_of(accepted)} do not convert")
            accepted += batch.num_rows
            for name in columns_from_file_or_computed:
                if name not in converted:
                    converted[name] = consts[name](converted)  # type: ignore[operator]
            progress.done_bytes = int((progress.rows + n) * row_bytes)
            progress.rows += n
            yield pa.RecordBatch.from_arrays(
                [converted[c] for c in columns_from_file_or_computed], names=columns_from_file_or_computed
            )
    except pa.ArrowInvalid as e:
        raise ImportFailure(f"{src.relpath}: cannot parse: {e}") from None
    finally:
        f.close()
        finder.close()


def _bytes_per_row(path: Path) -> float:
    with path.open("rb") as f:
        head = f.read(1 << 16)
    return len(head) / max(1, head.count(b"\n"))


def _convert(arrays: dict, types: dict[str, str]) -> dict | None:
    """String columns to their types; None when a value does not convert (rare: then per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    try:
        for name, arr in arrays.items():
            kind = types[name]
            if kind == schema.REAL:
                arr = pc.cast(arr, pa.float64())
                if pc.any(pc.is_nan(arr)).as_py():  # Rotation 'nan': unknown, so NULL
                    arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, pa.float64()), arr)
            elif kind in (schema.INT, schema.BIGINT):
                arr = pc.cast(pc.cast(arr, pa.float64()), pa.int64())
            elif name == "image_id" and arr.null_count:
                return None  # an annotation without an image is useless
            out[name] = arr
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return out


def _valid_rows(arrays: dict, types: dict[str, str]):  # noqa: ANN202
    """A boolean mask of the rows whose every number parses and that name an image."""
    import pyarrow.compute as pc

    ok = None
    for name, arr in arrays.items():
        kind = types[name]
        if kind == schema.TEXT:
            m = pc.invert(pc.is_null(arr)) if name == "image_id" else None
        else:
            m = pc.match_substring_regex(arr, _INT_RE if kind in (schema.INT, schema.BIGINT) else _NUM_RE)
            m = pc.or_kleene(m, pc.is_null(arr))
        if m is not None:
            ok = m if ok is None else pc.and_(ok, m)
    return ok


def _arrow_type(kind: str):  # noqa: ANN202
    import pyarrow as pa

    return {schema.TEXT: pa.string(), schema.REAL: pa.float64(), schema.INT: pa.int64(), schema.BIGINT: pa.int64()}[kind]


def _constant(value: object, kind: str, n: int):  # noqa: ANN202
    import pyarrow as pa

    if value is None:
        return pa.nulls(n, _arrow_type(kind))
    return pa.repeat(pa.scalar(value, _arrow_type(kind)), n)


def rows_to_batch(columns: list[tuple[str, str]], rows: list[tuple]):  # noqa: ANN201
    """Python rows (small files, JSON) as one RecordBatch of ``columns``."""
    import pyarrow as pa

    cols = list(zip(*rows)) if rows else [() for _ in columns]
    return pa.RecordBatch.from_arrays(
        [pa.array(list(c), _arrow_type(k)) for c, (_, k) in zip(cols, columns)], names=[c for c, _ in columns]
    )


class ImportFailure(Exception):
    """A file that cannot be imported at all; ``str()`` is the one line for the user."""


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(int(value))
    return "'" + str(value).replace("'", "''") + "'"


def write_batches(db: Database, table: str, batches: Iterator, literals: dict[str, object] | None = None) -> int:
    """Append ``batches`` (RecordBatches) to ``table``, every row also getting ``literals``.

    Constant columns (split, kind, file_id) travel as SQL literals / one CSV column built by
    pyarrow, never as a Python object per row. Returns rows written.
    """
    literals = {k: v for k, v in (literals or {}).items() if v is not None}
    total = 0
    first = next(batches, None)
    if first is None:
        return 0
    literals = {k: v for k, v in literals.items() if k not in first.schema.names}  # the file's own column wins
    batches = itertools.chain([first], batches)
    if db.backend == "sqlite":
        sql = None
        for b in batches:
            if sql is None:
                names = [*b.schema.names, *literals]
                values = ["?"] * b.num_columns + [_literal(v) for v in literals.values()]
                sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(values)})"
            py = [c.to_pylist() for c in b.columns]
            db.conn.executemany(sql, zip(*py))
            total += b.num_rows
        return total
    import pyarrow as pa
    import pyarrow.csv as pcsv

    opts = pcsv.WriteOptions(include_header=False, quoting_style="needed")
    names = [*first.schema.names, *literals]
    with db.conn.cursor() as cur:
        # the server parses CSV: pyarrow writes it from the arrays (C), psycopg streams it
        with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT csv)") as cp:
            for b in batches:
                for v in literals.values():
                    b = b.append_column("c" + str(b.num_columns), pa.repeat(pa.scalar(v), b.num_rows))
                buf = io.BytesIO()
                pcsv.write_csv(b, buf, opts)
                cp.write(buf.getbuffer())
                total += b.num_rows
    return total


def _stage(db: Database, table: str) -> str:
    """An empty temporary table shaped like ``table`` (for merges)."""
    name = f"stage_{table}"
    if db.backend == "sqlite":
        db.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} AS SELECT * FROM {table} WHERE 0")
    else:
        db.execute(f"CREATE TEMP TABLE IF NOT EXISTS {name} (LIKE {table})")
    db.execute(f"DELETE FROM {name}")
    return name


# ------------------------------------------------------------------------------------------
# One file
# ------------------------------------------------------------------------------------------


@dataclass
class FileResult:
    rows: int
    skipped: int


def _table_columns(table: str) -> list[tuple[str, str]]:
    return list(schema.BY_NAME[table].columns)


def _next_file_id(db: Database) -> int:
    row = db.query("SELECT COALESCE(MAX(file_id), 0) + 1 FROM imports")
    return int(row[0][0])


def import_file(db: Database, src: Source, root: Path, out: Callable[[str], None], progress: Progress) -> FileResult:
    """Load one file in one transaction (the caller commits with the ``imports`` row)."""
    bad = Malformed(src.relpath, out)
    cols = _table_columns(src.table)
    names = [c for c, _ in cols]
    file_id = int(src.extra["file_id"])
    consts: dict[str, object] = {"file_id": file_id, "split": src.split}
    if src.table == "image_labels":
        consts["kind"] = src.extra["label_kind"]
    if src.table == "segmentations" and src.split:
        # the mask PNG stays in its zip: <dir>/<split>-masks/<split>-masks-<first hex digit>.zip
        import pyarrow.compute as pc

        prefix = f"{Path(src.relpath).parent.as_posix()}/{src.split}-masks/{src.split}-masks-".lstrip("./")
        consts["mask_zip"] = lambda a: pc.binary_join_element_wise(
            prefix, pc.utf8_slice_codeunits(a["image_id"], 0, 1), ".zip", ""
        )

    # constants for every row (split is the file's own Subset column where it has one)
    lits = {k: v for k, v in consts.items() if not callable(v) and k in names}
    if src.fmt == "csv" and src.table == "images":
        stage = _stage(db, "images")
        n = write_batches(db, stage, read_csv_batches(src, cols, consts, bad, progress), lits)
        _merge_images(db, stage)
        return FileResult(n, bad.count)
    if src.fmt == "csv" and src.table == "relationship_triplets":
        rows = _small_csv(src, bad, 3, header_first="labelname1")
        db.execute("DELETE FROM relationship_triplets")
        db.executemany(
            "INSERT INTO relationship_triplets (mid1, mid2, relationship) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", rows
        )
        return FileResult(len(rows), bad.count)
    if src.fmt == "csv":
        batches = read_csv_batches(src, cols, consts, bad, progress)
        merge = src.table == "image_labels" and src.extra.get("boxable") and _has_full_sibling(db, src)
        if db.backend == "postgres" and not merge and not any(callable(v) for v in consts.values()):
            n = _copy_raw(db, src, lits, progress)
            if n is not None:
                return FileResult(n, 0)
            progress.rows = progress.done_bytes = 0
        if merge:
            # a label in both the full file and this -boxable subset is stored once
            if db.backend == "sqlite":  # the anti-join below needs it; PostgreSQL hashes instead
                for stmt in schema.index_sql(schema.BY_NAME["image_labels"]):
                    db.execute(stmt)
            stage = _stage(db, "image_labels")
            n = write_batches(db, stage, batches, lits)
            cur = db.execute(
                f"INSERT INTO image_labels SELECT * FROM {stage} s WHERE NOT EXISTS (SELECT 1 FROM image_labels l "
                "WHERE l.image_id = s.image_id AND l.mid = s.mid AND l.source = s.source AND l.kind = s.kind "
                "AND l.confidence = s.confidence AND l.split = s.split)"
            )
            kept = cur.rowcount
            if n - kept:
                out(f"note: {src.relpath}: {n - kept} of {n} rows are already in the full label file; stored once")
            return FileResult(kept, bad.count)
        n = write_batches(db, src.table, batches, lits)
        return FileResult(n, bad.count)
    if src.fmt == "names":
        rows = _small_csv(src, bad, 2, header_first="labelname")
        stage = _stage(db, "classes")
        write_batches(db, stage, iter([rows_to_batch([("mid", schema.TEXT), ("name", schema.TEXT)], rows)]))
        db.execute(
            f"INSERT INTO classes (mid, name) SELECT mid, MAX(name) FROM {stage} GROUP BY mid "
            "ON CONFLICT (mid) DO UPDATE SET name = COALESCE(excluded.name, classes.name)"
        )
        if src.extra.get("list"):
            _load_list(db, [r[0] for r in rows], src.extra["list"], src.rank, file_id)
        return FileResult(len(rows), bad.count)
    if src.fmt == "list":
        mids = []
        with src.path.open(encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                mid = line.strip().split(",")[0].strip('"')
                if not mid:
                    continue
                if not mid.startswith("/"):
                    if i == 1:
                        continue  # a header
                    bad(i, f"{mid[:40]!r} is not a MID")
                    continue
                mids.append(mid)
        _load_list(db, mids, src.extra["list"], src.rank, file_id)
        return FileResult(len(mids), bad.count)
    if src.fmt == "pairs":
        rows = _small_csv(src, bad, 2, header_first="labelname")
        key = "label" if src.table == "relationship_descriptions" else "mid"
        db.execute(f"DELETE FROM {src.table}")
        db.executemany(f"INSERT INTO {src.table} ({key}, name) VALUES (?, ?) ON CONFLICT DO NOTHING", rows)
        return FileResult(len(rows), bad.count)
    if src.fmt == "hierarchy":
        return _load_hierarchy(db, src, bad)
    if src.fmt == "jsonl":
        return FileResult(write_batches(db, "narratives", _narrative_batches(src, cols, file_id, bad, progress)), bad.count)
    raise AssertionError(src.fmt)


def _copy_raw(db: Database, src: Source, lits: dict[str, object], progress: Progress) -> int | None:
    """PostgreSQL: stream the file's bytes as they are into ``COPY`` (the server parses).

    The fastest path, for a file whose every column maps to the table. A malformed row makes
    the server refuse the whole COPY: then this rolls back to a savepoint and returns None,
    and the file goes through the validating reader, which reports and skips the bad rows.
    Constant columns (split, kind, file_id) are column DEFAULTs for the length of the COPY
    (transactional DDL: a killed import leaves no trace of them).
    """
    import psycopg

    header = [h.strip() for h in _sniff_header(src.path)]
    mapping = _HEADER_MAP[src.table]
    cols = [mapping.get(h.lower().replace("_", "")) for h in header]
    types = dict(schema.BY_NAME[src.table].columns)
    if not cols or None in cols or len(set(cols)) != len(cols) or "image_id" not in cols:
        return None
    text_cols = [c for c in cols if types[c] == schema.TEXT]
    lits = {k: v for k, v in lits.items() if k not in cols}
    db.execute("SAVEPOINT raw_copy")
    try:
        for k, v in lits.items():
            db.execute(f"ALTER TABLE {src.table} ALTER COLUMN {k} SET DEFAULT {_literal(v)}")
        with db.conn.cursor() as cur:
            with cur.copy(
                f"COPY {src.table} ({', '.join(cols)}) FROM STDIN (FORMAT csv, HEADER true, FORCE_NULL ({', '.join(text_cols)}))"
            ) as cp, src.path.open("rb") as f:
                while block := f.read(1 << 20):
                    cp.write(block)
                    progress.done_bytes += len(block)
            n = cur.rowcount
        progress.rows = n
        for k in lits:
            db.execute(f"ALTER TABLE {src.table} ALTER COLUMN {k} DROP DEFAULT")
        db.execute("RELEASE SAVEPOINT raw_copy")
        return n
    except psycopg.DataError:
        db.execute("ROLLBACK TO SAVEPOINT raw_copy")
        return None


def _has_full_sibling(db: Database, src: Source) -> bool:
    full_slot = src.slot.replace(":boxable:", ":full:") if src.slot else ""
    return bool(db.query("SELECT 1 FROM imports WHERE slot = ?", (full_slot,)))


def _merge_images(db: Database, stage: str) -> None:
    """One row per image: a list that repeats an image fills in what was NULL, keeps the rest."""
    cols = [c for c, _ in schema.BY_NAME["images"].columns]
    sets = ", ".join(f"{c} = COALESCE(excluded.{c}, images.{c})" for c in cols if c != "image_id")
    pick = "SELECT * FROM {s} WHERE true" if db.backend == "sqlite" else "SELECT DISTINCT ON (image_id) * FROM {s}"
    db.execute(f"INSERT INTO images ({', '.join(cols)}) {pick.format(s=stage)} ON CONFLICT (image_id) DO UPDATE SET {sets}")


def _load_list(db: Database, mids: list[str], lst: str, rank: int, file_id: int) -> None:
    stage = _stage(db, "class_lists")
    write_batches(db, stage, iter([rows_to_batch([("mid", schema.TEXT)], [(m,) for m in mids])]),
                  {"list": lst, "rank": rank, "file_id": file_id})
    db.execute(
        f"INSERT INTO class_lists (mid, list, rank, file_id) SELECT DISTINCT mid, list, rank, file_id FROM {stage} "
        "WHERE true ON CONFLICT DO NOTHING"
    )
    db.execute(f"INSERT INTO classes (mid) SELECT DISTINCT mid FROM {stage} WHERE true ON CONFLICT (mid) DO NOTHING")


def refresh_class_flags(db: Database) -> None:
    """classes.boxable/trainable/segmentable from the newest list of each name (set-based: fast on both)."""
    db.execute(
        "INSERT INTO classes (mid) SELECT DISTINCT mid FROM class_lists WHERE true ON CONFLICT (mid) DO NOTHING"
    )
    for flag, lst in (("boxable", "boxable"), ("trainable", "trainable"), ("segmentable", "segmentable")):
        newest = db.query("SELECT MAX(rank) FROM class_lists WHERE list = ?", (lst,))[0][0]
        if newest is None:
            db.execute(f"UPDATE classes SET {flag} = NULL WHERE {flag} IS NOT NULL")
            continue
        db.execute(f"UPDATE classes SET {flag} = 0")
        db.execute(
            f"UPDATE classes SET {flag} = 1 WHERE mid IN (SELECT mid FROM class_lists WHERE list = ? AND rank = ?)",
            (lst, newest),
        )


def _small_csv(src: Source, bad: Malformed, width: int, *, header_first: str) -> list[tuple]:
    """A small CSV, header or not (class descriptions have none in some releases)."""
    rows = []
    with src.path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        for i, r in enumerate(csv.reader(f), 1):
            if not r or not any(x.strip() for x in r):
                continue
            if i == 1 and r[0].strip().lower().replace("_", "") in (header_first, "mid", "labelname", "label"):
                continue
            if len(r) != width:
                bad(i, f"{len(r)} columns, expected {width}")
                continue
            rows.append(tuple(x.strip() or None for x in r))
    return rows


_ENTITY = "/m/0bl9f"  # the hierarchy's root; no class list names it


def _load_hierarchy(db: Database, src: Source, bad: Malformed) -> FileResult:
    try:
        root = json.loads(src.path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ImportFailure(f"{src.relpath}: not a class hierarchy: {e}") from None
    edges: set[tuple[str, str, str]] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
            bad(None, "a hierarchy node without a LabelName")
            continue
        for key, rel in (("Subcategory", "subcategory"), ("Part", "part")):
            for child in node.get(key, ()) or ():
                if isinstance(child, dict) and isinstance(child.get("LabelName"), str):
                    edges.add((node["LabelName"], child["LabelName"], rel))
                stack.append(child)
    db.execute("DELETE FROM class_edges")
    db.executemany("INSERT INTO class_edges (parent, child, relation) VALUES (?, ?, ?)", sorted(edges))
    if isinstance(root, dict) and root.get("LabelName") == _ENTITY:
        db.execute(
            "INSERT INTO classes (mid, name) VALUES (?, ?) ON CONFLICT (mid) DO UPDATE SET name = "
            "COALESCE(classes.name, excluded.name)",
            (_ENTITY, "Entity"),
        )
    return FileResult(len(edges), bad.count)


def _narrative_batches(src: Source, cols: list[tuple[str, str]], file_id: int, bad: Malformed, progress: Progress) -> Iterator:
    keys = [c for c, _ in cols]
    rows: list[tuple] = []
    with src.path.open("rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("image_id"), str):
                    raise ValueError("no image_id")
            except ValueError as e:
                bad(i, f"not a narrative JSON object ({str(e)[:60]})")
                continue
            row = []
            for k in keys:
                if k == "split":
                    row.append(src.split)
                elif k == "file_id":
                    row.append(file_id)
                else:
                    v = obj.get(k)
                    row.append(json.dumps(v) if isinstance(v, (list, dict)) else (None if v is None else str(v)))
            rows.append(tuple(row))
            if len(rows) >= 20_000:
                progress.done_bytes, progress.rows = f.tell(), progress.rows + len(rows)
                yield rows_to_batch(cols, rows)
                rows = []
        progress.done_bytes, progress.rows = f.tell(), progress.rows + len(rows)
    if rows:
        yield rows_to_batch(cols, rows)


# ------------------------------------------------------------------------------------------
# The whole import
# ------------------------------------------------------------------------------------------


@dataclass
class Summary:
    files: int = 0
    unchanged: int = 0
    rows: int = 0
    malformed: int = 0
    failed: int = 0
    per_table: dict[str, int] = field(default_factory=dict)


def _delete_rows_of(db: Database, table: str, file_id: int) -> None:
    if table in schema.ANNOTATION_TABLES:
        db.execute(f"DELETE FROM {table} WHERE file_id = ?", (file_id,))
    elif table == "class_lists" or table == "classes":
        db.execute("DELETE FROM class_lists WHERE file_id = ?", (file_id,))


def run_import(
    db: Database,
    root: Path,
    sources: list[Source],
    *,
    force: bool = False,
    out: Callable[[str], None] = print,
    display: _Display | None = None,
) -> Summary:
    summary = Summary()
    previous = {r[0]: r for r in db.query("SELECT path, size, mtime_ns, file_id, slot, kind FROM imports")}
    selected = {s.relpath for s in sources}
    loaded_tables: set[str] = set()
    reloaded_full_slots: set[str] = set()
    for src in sources:
        st = src.path.stat()
        prev = previous.get(src.relpath)
        forced_by_full = src.extra.get("boxable") and (src.slot or "").replace(":boxable:", ":full:") in reloaded_full_slots
        if prev and not force and not forced_by_full and prev[1] == st.st_size and prev[2] == st.st_mtime_ns:
            summary.unchanged += 1
            continue
        progress = Progress()
        db.begin()
        try:
            file_id = _next_file_id(db)
            src.extra["file_id"] = file_id
            if prev:
                _delete_rows_of(db, prev[5], int(prev[3]))
                db.execute("DELETE FROM imports WHERE path = ?", (src.relpath,))
            # rows of an older release's file in the same slot give way to this one
            if src.slot:
                for path, fid, table in db.query("SELECT path, file_id, kind FROM imports WHERE slot = ?", (src.slot,)):
                    if path in selected:
                        continue  # a sibling (narrative shards share a slot)
                    _delete_rows_of(db, table, int(fid))
                    db.execute("DELETE FROM imports WHERE path = ?", (path,))
                    out(f"replaced {path} (superseded by {src.relpath})")
            t0 = time.monotonic()
            if display:
                display.start(src, st.st_size, progress)
            result = import_file(db, src, root, out, progress)
            db.execute(
                "INSERT INTO imports (path, kind, size, mtime_ns, rows, skipped, imported_at, file_id, slot, rank) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (src.relpath, src.table, st.st_size, st.st_mtime_ns, result.rows, result.skipped, time.time(), file_id,
                 src.slot, src.rank),
            )
            db.commit()
        except ImportFailure as e:
            db.rollback()
            if display:
                display.stop()
            out(f"error: {e}")
            summary.failed += 1
            continue
        except BaseException:
            db.rollback()
            if display:
                display.stop()
            raise
        if display:
            display.stop()
        dt = time.monotonic() - t0
        rate = f", {result.rows / dt:,.0f} rows/s" if dt > 0.5 else ""
        extra = f", {result.skipped} malformed skipped" if result.skipped else ""
        out(f"imported {src.relpath}: {result.rows:,} rows into {src.table} in {dt:.1f} s{rate}{extra}")
        if src.table == "image_labels" and not src.extra.get("boxable"):
            reloaded_full_slots.add(src.slot or "")
        summary.files += 1
        summary.rows += result.rows
        summary.malformed += result.skipped
        summary.per_table[src.table] = summary.per_table.get(src.table, 0) + result.rows
        loaded_tables.add(src.table)
    # the class flags from whatever lists are imported now (cheap; also repairs a killed run)
    db.begin()
    refresh_class_flags(db)
    db.commit()
    # always (IF NOT EXISTS): an import interrupted before this point gets them on the re-run
    t0 = time.monotonic()
    if loaded_tables:
        out("building indexes ...")
    db.create_indexes()
    if loaded_tables:
        out(f"indexes built in {time.monotonic() - t0:.1f} s")
    return summary


class _Display:
    """A progress bar per file (rich, on a terminal) or a line every few seconds."""

    def __init__(self, tty: bool, interval_s: float = 5.0) -> None:
        self.tty = tty
        self.interval_s = interval_s
        self._bar = None
        self._stop = None

    def start(self, src: Source, size: int, progress: Progress) -> None:
        import threading

        stop = threading.Event()
        self._stop = stop
        t0 = time.monotonic()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rows]:>12,} rows"),
                TextColumn("{task.fields[rate]:>9,.0f} rows/s"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )
            bar.start()
            task = bar.add_task(src.relpath, total=max(size, 1), rows=0, rate=0.0)
            self._bar = bar

            def tick() -> None:
                while not stop.wait(0.2):
                    dt = max(time.monotonic() - t0, 1e-9)
                    bar.update(task, completed=progress.done_bytes, rows=progress.rows, rate=progress.rows / dt)
        else:

            def tick() -> None:
                while not stop.wait(self.interval_s):
                    dt = max(time.monotonic() - t0, 1e-9)
                    rate = progress.rows / dt
                    frac = progress.done_bytes / size if size else 0
                    frac = min(frac, 1.0)
                    eta = _eta(dt / frac - dt) if frac > 0 else "?"
                    print(
                        f"{src.relpath}: {progress.rows:,} rows ({100 * frac:.0f}%), {rate:,.0f} rows/s, ETA {eta}",
                        file=sys.stderr, flush=True,
                    )

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

COMMANDS = ("db",)
DEFAULT_DB_NAME = "openimages.sqlite"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "db",
        help="the annotations database: import metadata into SQLite or PostgreSQL",
        description="The Open Images annotations database (see the README for its schema).",
    )
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    imp = dsub.add_parser(
        "import",
        help="import every metadata file under a directory",
        description=(
            "Import every Open Images metadata file found under --meta-dir (the layouts 'oidl-engine metadata' "
            "writes, releases v1-v7, plus Localized Narratives) into a SQLite file or a PostgreSQL database. "
            "Each file is one transaction; a re-run skips unchanged files and replaces changed ones, so it never "
            "doubles a row. Where a directory holds several releases' versions of the same file, the newest "
            "release's is imported. Malformed rows are reported with file and line and skipped."
        ),
    )
    imp.add_argument("--meta-dir", required=True, type=Path, help="the directory 'oidl-engine metadata --dir' filled")
    imp.add_argument(
        "--db",
        help=f"a SQLite file, or a postgresql://user@host/dbname URL (default: META_DIR/{DEFAULT_DB_NAME})",
    )
    imp.add_argument(
        "--only",
        action="append",
        choices=KINDS,
        metavar="KIND",
        help=f"import only this kind of file (repeatable): {', '.join(KINDS)}",
    )
    imp.add_argument("--force", action="store_true", help="re-import files even when unchanged since the last import")


def run(args: argparse.Namespace) -> int:
    root: Path = args.meta_dir
    if not root.is_dir():
        print(f"error: --meta-dir {root} is not a directory", file=sys.stderr)
        return 2
    only = set(args.only) if args.only else None
    sources, dropped, unknown = discover(root, only)
    if not sources:
        what = f" of kind {', '.join(sorted(only))}" if only else ""
        print(f"error: no Open Images metadata files{what} under {root} (run 'oidl-engine metadata' first)", file=sys.stderr)
        return 2
    for old, new in dropped:
        print(f"skipping {old.relpath}: superseded by {new.relpath}")
    if unknown:
        print(f"note: {len(unknown)} file(s) not recognised, left alone: {', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    target = args.db or str(root / DEFAULT_DB_NAME)
    if not is_postgres(target) and Path(target).is_dir():
        print(f"error: --db {target} is a directory; give a file name or a postgresql:// URL", file=sys.stderr)
        return 2
    try:
        db = connect(target, create=True)
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if is_postgres(target) and "psycopg" in str(e) else 1
    display = _Display(sys.stderr.isatty())
    t0 = time.monotonic()
    try:
        with db:
            summary = run_import(db, root, sources, force=args.force, out=lambda m: print(m, flush=True), display=display)
    except KeyboardInterrupt:
        display.stop()
        print("interrupted: every file imported so far is complete; run the same command again to go on", file=sys.stderr)
        return 130
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a database error mid-import: one line, not a traceback
        if type(e).__module__.startswith(("sqlite3", "psycopg")):
            print(f"error: {describe(target)}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return 1
        raise
    dt = time.monotonic() - t0
    parts = ", ".join(f"{t} {n:,}" for t, n in sorted(summary.per_table.items()))
    print(
        f"done in {dt:.1f} s: {summary.files} file(s) imported ({parts or 'nothing new'}), "
        f"{summary.unchanged} unchanged, {summary.malformed} malformed row(s) skipped into {describe(target)}"
    )
    if summary.failed:
        print(f"error: {summary.failed} file(s) could not be imported", file=sys.stderr)
        return 1
    return 0
