"""The state database: the contract other tools and checks read.

SQLite in WAL mode. Only the writer process writes (in batched transactions); the supervisor
reads it to skip finished rows on resume, ``oidl-engine results`` reads it to write CSVs.
A row appears in ``images`` only once it is finished (``ok`` or ``failed``): a row that was
in flight when a run died has no row here, so the next run simply does it again.

The schema is documented in the README; change both together.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

SCHEMA_VERSION = 3  # 2: lists.error_reason, error_line, error_detail; 3: outputs.shard_offset, shards

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lists (
    list_id INTEGER PRIMARY KEY,
    path    TEXT NOT NULL UNIQUE,
    kind    TEXT NOT NULL,
    columns TEXT NOT NULL,             -- JSON array: the list's own header columns
    error_reason TEXT,                 -- NULL when the last run read the list to its end; else why
    error_line   INTEGER,              --   not (engine.errors.Reason), the last line read before,
    error_detail TEXT                  --   and the reader's message
);
CREATE TABLE IF NOT EXISTS images (
    image_id   TEXT PRIMARY KEY,
    status     TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    reason     TEXT,                   -- NULL when ok; else one value of engine.errors.Reason
    detail     TEXT,                   -- human detail for failures (curl message, decoder error)
    url        TEXT,                   -- the URL fetched (NULL when nothing was fetched)
    bytes      INTEGER,                -- body bytes downloaded
    md5        TEXT,                   -- hex MD5 of the body downloaded
    width      INTEGER,                -- source image size as oriented
    height     INTEGER,
    format     TEXT,                   -- real format found by sniffing: jpeg, png, webp, gif
    attempts   INTEGER,                -- transfer attempts used
    list_id    INTEGER REFERENCES lists(list_id),
    line       INTEGER,                -- line of the row in its list
    fields     TEXT,                   -- JSON array: the raw row in the list's columns
    updated_at REAL NOT NULL           -- unix time
);
CREATE INDEX IF NOT EXISTS images_status ON images(status, reason);
CREATE TABLE IF NOT EXISTS outputs (
    image_id TEXT NOT NULL,
    variant  TEXT NOT NULL,            -- 'original' or the variant's name (its directory)
    path     TEXT NOT NULL,            -- relative to --out: the file, or the shard holding the image
    bytes    INTEGER NOT NULL,
    width    INTEGER,
    height   INTEGER,
    shard_offset INTEGER,              -- NULL for a file; in a shard: tar data offset, TFRecord record offset, parquet row
    PRIMARY KEY (image_id, variant)
);
CREATE TABLE IF NOT EXISTS shards (
    path       TEXT PRIMARY KEY,       -- relative to --out, e.g. 256/00007.tar
    variant    TEXT NOT NULL,
    format     TEXT NOT NULL,          -- webdataset | tfrecord | parquet
    images     INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class OutputRow:
    variant: str
    path: str
    nbytes: int
    width: int | None
    height: int | None
    offset: int | None = None  # where in its shard (None for a file)


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    status: str
    reason: str | None
    detail: str | None
    url: str | None
    nbytes: int | None
    md5: str | None
    width: int | None
    height: int | None
    format: str | None
    attempts: int
    list_id: int | None
    line: int | None
    fields: Sequence[str] | None
    outputs: Sequence[OutputRow] = ()


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    else:
        conn = sqlite3.connect(str(path), timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash can lose
        # the last transactions, which the next run then simply redoes.
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


#: columns added after version 1, added in place to a DB an older version made
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("lists", "error_reason", "TEXT"),
    ("lists", "error_line", "INTEGER"),
    ("lists", "error_detail", "TEXT"),
    ("outputs", "shard_offset", "INTEGER"),
)


def init(path: Path | str) -> None:
    conn = connect(path)
    try:
        with conn:
            conn.executescript(SCHEMA)
            for table, column, decl in _ADDED_COLUMNS:
                if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET"
                " value=excluded.value WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                (str(SCHEMA_VERSION),),
            )
    finally:
        conn.close()


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


#: ``meta`` value of a run option that earlier runs of the same OUT set differently
MIXED = "mixed"


def record_run_option(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Remember an option that decides the geometry of the files (``apply_rotation``).

    ``export`` needs it to map boxes onto the files. Once two runs into the same OUT disagree
    (or a DB from before this key already holds files) the value becomes ``mixed``: the
    files no longer share one geometry.
    """
    with conn:
        old = get_meta(conn, key)
        if old is None:
            if conn.execute("SELECT 1 FROM outputs LIMIT 1").fetchone() is not None:
                value = MIXED
            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, value))
        elif old != value and old != MIXED:
            conn.execute("UPDATE meta SET value=? WHERE key=?", (MIXED, key))


def register_list(conn: sqlite3.Connection, path: str, kind: str, columns: Sequence[str]) -> int:
    with conn:
        conn.execute(
            "INSERT INTO lists(path, kind, columns) VALUES (?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET kind=excluded.kind, columns=excluded.columns,"
            " error_reason=NULL, error_line=NULL, error_detail=NULL",  # this run reads it again
            (path, kind, json.dumps(list(columns))),
        )
    row = conn.execute("SELECT list_id FROM lists WHERE path=?", (path,)).fetchone()
    return int(row[0])


def list_broken(conn: sqlite3.Connection, list_id: int, reason: str, line: int, detail: str) -> None:
    """Record that a list could not be read past ``line``: the run did not see the rest of it."""
    with conn:
        conn.execute(
            "UPDATE lists SET error_reason=?, error_line=?, error_detail=? WHERE list_id=?",
            (reason, line, detail, list_id),
        )


def finished_ids(conn: sqlite3.Connection, ids: Sequence[str], *, include_failed: bool) -> set[str]:
    """Which of ``ids`` are finished and must be skipped (one query per batch of rows)."""
    if not ids:
        return set()
    out: set[str] = set()
    status = "" if include_failed else " AND status='ok'"
    for i in range(0, len(ids), 900):  # stay under SQLite's host-parameter limit
        chunk = ids[i : i + 900]
        q = f"SELECT image_id FROM images WHERE image_id IN ({','.join('?' * len(chunk))}){status}"
        out.update(r[0] for r in conn.execute(q, chunk))
    return out


def write_batch(conn: sqlite3.Connection, rows: Iterable[ImageRow], shards: Iterable = ()) -> None:
    """One transaction for a batch: images upserted, their outputs replaced, and the shards
    (``engine.sinks.shards.ShardRecord``) that hold them recorded in the same commit."""
    now = time.time()
    with conn:
        conn.executemany(
            "INSERT OR REPLACE INTO shards(path, variant, format, images, bytes, created_at) VALUES (?,?,?,?,?,?)",
            [(s.path, s.variant, s.format, s.images, s.nbytes, now) for s in shards],
        )
        for r in rows:
            conn.execute(
                "INSERT INTO images(image_id, status, reason, detail, url, bytes, md5, width, height, format,"
                " attempts, list_id, line, fields, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(image_id) DO UPDATE SET status=excluded.status, reason=excluded.reason,"
                " detail=excluded.detail, url=excluded.url, bytes=excluded.bytes, md5=excluded.md5,"
                " width=excluded.width, height=excluded.height, format=excluded.format,"
                " attempts=excluded.attempts, list_id=excluded.list_id, line=excluded.line,"
                " fields=excluded.fields, updated_at=excluded.updated_at",
                (
                    r.image_id,
                    r.status,
                    r.reason,
                    r.detail,
                    r.url,
                    r.nbytes,
                    r.md5,
                    r.width,
                    r.height,
                    r.format,
                    r.attempts,
                    r.list_id,
                    r.line,
                    json.dumps(list(r.fields)) if r.fields is not None else None,
                    now,
                ),
            )
            conn.execute("DELETE FROM outputs WHERE image_id=?", (r.image_id,))
            if r.outputs:
                conn.executemany(
                    "INSERT INTO outputs(image_id, variant, path, bytes, width, height, shard_offset)"
                    " VALUES (?,?,?,?,?,?,?)",
                    [(r.image_id, o.variant, o.path, o.nbytes, o.width, o.height, o.offset) for o in r.outputs],
                )


def shard_paths(conn: sqlite3.Connection) -> set[str]:
    """Paths of every committed shard (a ``.part`` file not named here was never committed)."""
    return {r[0] for r in conn.execute("SELECT path FROM shards")}


def status_counts(conn: sqlite3.Connection) -> dict[tuple[str, str | None], int]:
    return {
        (s, r): n for s, r, n in conn.execute("SELECT status, reason, COUNT(*) FROM images GROUP BY status, reason")
    }


def iter_images(conn: sqlite3.Connection, status: str) -> Iterator[tuple[str, str | None, str | None, int | None, str | None]]:
    """(image_id, reason, detail, list_id, fields_json) in list order, streamed."""
    yield from conn.execute(
        "SELECT image_id, reason, detail, list_id, fields FROM images WHERE status=? ORDER BY list_id, line",
        (status,),
    )


def lists(conn: sqlite3.Connection) -> dict[int, tuple[str, str, list[str]]]:
    return {lid: (p, k, json.loads(c)) for lid, p, k, c in conn.execute("SELECT list_id, path, kind, columns FROM lists")}
