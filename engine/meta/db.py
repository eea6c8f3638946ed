"""Connections to the annotations database: a SQLite file or a ``postgresql://`` URL.

``connect(target)`` is the one entry point ``db import``, ``select``, ``export`` and the shard
writers share. Queries are written once with ``?`` placeholders; :meth:`Database.execute`
rewrites them to ``%s`` for psycopg. Bulk loading (``executemany`` for SQLite, ``COPY`` for
PostgreSQL) lives in :mod:`engine.meta.importer`.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from engine.meta import schema


class DatabaseError(Exception):
    """A failure to open or use the database; ``str()`` is the one line shown to the user."""


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def describe(target: str | Path) -> str:
    """The target without a password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", str(target))


@dataclass
class Database:
    backend: str  # "sqlite" | "postgres"
    conn: Any  # sqlite3.Connection | psycopg.Connection
    target: str

    @property
    def placeholder(self) -> str:
        return "?" if self.backend == "sqlite" else "%s"

    def sql(self, text: str) -> str:
        """``?`` placeholders to the backend's own (never inside our literals: we write none with '?')."""
        return text if self.backend == "sqlite" else text.replace("%", "%%").replace("?", "%s")

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        if self.backend == "postgres" and not params:
            return self.conn.execute(text)  # no placeholders: '%' in a LIKE pattern stays as it is
        return self.conn.execute(self.sql(text), tuple(params))

    def query(self, text: str, params: Sequence[Any] = ()) -> list[tuple]:
        return list(self.execute(text, params).fetchall())

    def executemany(self, text: str, rows: Iterable[Sequence[Any]]) -> None:
        if self.backend == "sqlite":
            self.conn.executemany(text, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.sql(text), list(rows))

    def begin(self) -> None:
        if self.backend == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
        # psycopg opens a transaction at the first statement (autocommit off)

    def commit(self) -> None:
        self.conn.commit() if self.backend == "postgres" else self.conn.execute("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.rollback() if self.backend == "postgres" else self.conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - nothing to roll back (or the connection is gone)
            pass

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema --------------------------------------------------------------------------
    def create_schema(self) -> None:
        """Every table of :mod:`schema` (idempotent); indexes come after a bulk load."""
        self.begin()
        for table in schema.TABLES:
            self.execute(schema.create_table_sql(table, self.backend))
        self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            ("schema_version", str(schema.SCHEMA_VERSION)),
        )
        self.commit()

    def create_indexes(self, tables: Iterable[str] | None = None) -> None:
        names = set(tables) if tables is not None else None
        for table in schema.TABLES:
            if names is not None and table.name not in names:
                continue
            for stmt in schema.index_sql(table):
                self.begin()
                self.execute(stmt)
                self.commit()
        if self.backend == "postgres":
            # fresh statistics, so the planner uses the new indexes at once; VACUUM sets the
            # visibility map, without which "images of class X" cannot be an index-only scan
            # (seconds instead of milliseconds on millions of boxes). Pages already all-visible
            # are skipped, so a re-run costs little.
            self.conn.autocommit = True
            try:
                for table in schema.TABLES:
                    if names is None or table.name in names:
                        self.conn.execute(f"VACUUM (ANALYZE) {table.name}")
            finally:
                self.conn.autocommit = False
        else:
            self.conn.execute("PRAGMA optimize")

    def table_exists(self, name: str) -> bool:
        if self.backend == "sqlite":
            return bool(self.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))
        return bool(self.query("SELECT 1 FROM information_schema.tables WHERE table_name = ?", (name,)))


#: SQLite settings for a bulk load. A rollback journal, not WAL: appending to new pages
#: journals almost nothing, where WAL writes every page twice (log, then checkpoint); and not
#: journal_mode=OFF, with which a killed import can corrupt the file. synchronous=OFF: a
#: killed process loses nothing the OS has; only a power cut could cost the last file.
_SQLITE_LOAD_PRAGMAS = ("PRAGMA journal_mode=DELETE", "PRAGMA synchronous=OFF")
# a 32 MB page cache (the index sorter may use as much again): peak RSS of an import ~200 MB
_SQLITE_PRAGMAS = ("PRAGMA cache_size=-32768", "PRAGMA temp_store=FILE")


def connect(target: str | Path, *, create: bool = False) -> Database:
    """Open the database at ``target`` (a SQLite path or a ``postgresql://`` URL).

    ``create`` makes the schema (import does; readers open an existing database and get a
    clear error when it is missing).
    """
    if is_postgres(target):
        try:
            import psycopg
        except ImportError:
            raise DatabaseError(
                "a postgresql:// target needs psycopg 3: pip install 'oidl-engine[postgres]'"
            ) from None
        try:
            conn = psycopg.connect(str(target), autocommit=False, connect_timeout=10)
        except psycopg.Error as e:
            raise DatabaseError(f"cannot connect to {describe(target)}: {str(e).strip().splitlines()[0]}") from None
        db = Database("postgres", conn, str(target))
    else:
        path = Path(target)
        if not create and not path.is_file():
            raise DatabaseError(f"no database at {path} (run 'oidl-engine db import' first)")
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            for p in _SQLITE_PRAGMAS + (_SQLITE_LOAD_PRAGMAS if create else ()):
                conn.execute(p)
        except (sqlite3.Error, OSError) as e:
            raise DatabaseError(f"cannot open {path}: {e}") from None
        db = Database("sqlite", conn, str(path))
    if create:
        db.create_schema()
    elif not db.table_exists("images"):
        db.close()
        raise DatabaseError(f"{describe(target)} holds no Open Images tables (run 'oidl-engine db import' first)")
    return db
