"""A thin, backend-neutral handle on the annotations database (SQLite file or PostgreSQL URL).

``select`` and ``export`` write their SQL once, in portable SQL with ``?`` placeholders;
this module hides the one difference that matters to them: psycopg wants ``%s``. Results
are streamed (a server-side cursor on PostgreSQL, SQLite's own lazy cursor), so a query
over millions of rows never sits in memory whole.
"""

from __future__ import annotations

import itertools
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

#: rows fetched per round trip from a server-side cursor
_FETCH_ROWS = 5000
#: placeholders per ``IN (...)`` list: under SQLite's historical limit of 999 host parameters
IN_CHUNK = 500


class DatabaseError(Exception):
    """The annotations database cannot be opened or read; the message is fit for the user."""


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


class Database:
    """One open connection: ``backend`` is ``"sqlite"`` or ``"postgres"``."""

    def __init__(self, conn: Any, backend: str) -> None:
        self.conn = conn
        self.backend = backend

    def close(self) -> None:
        try:
            if self.backend == "postgres":
                self.conn.rollback()  # nothing was written: end the read transaction
        finally:
            self.conn.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_cursor_names = itertools.count()


def stream(db: Any, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple]:
    """Stream the rows of one SELECT written with ``?`` placeholders, on either backend.

    ``db`` is anything with ``backend`` and ``conn``. PostgreSQL rows come through a named
    (server-side) cursor, ``_FETCH_ROWS`` at a time: a client-side cursor would hold the
    whole result in memory.
    """
    try:
        if db.backend == "sqlite":
            yield from db.conn.execute(sql, tuple(params))
            return
        with db.conn.cursor(name=f"oidl_{next(_cursor_names)}") as cur:
            cur.itersize = _FETCH_ROWS
            cur.execute(sql.replace("?", "%s"), tuple(params))
            yield from cur
    except Exception as e:  # noqa: BLE001 - sqlite3.Error or psycopg.Error: one message for the user
        if not _is_db_error(e):
            raise
        raise DatabaseError(f"query failed ({' '.join(str(e).split())}); is this an 'oidl-engine db import' database?") from None


def open_database(target: str | Path) -> Database:
    """Open TARGET for reading: a SQLite file that must exist, or a ``postgresql://`` URL."""
    text = str(target)
    if is_postgres_url(text):
        try:
            import psycopg
        except ImportError:
            raise DatabaseError(
                "a postgresql:// target needs psycopg: pip install 'oidl-engine[postgres]'"
            ) from None
        try:
            conn = psycopg.connect(text, connect_timeout=10)
        except psycopg.Error as e:
            raise DatabaseError(f"cannot connect to {text}: {str(e).strip()}") from None
        return Database(conn, "postgres")
    path = Path(text)
    if not path.is_file():
        raise DatabaseError(f"no annotations database at {path} (create it with 'oidl-engine db import')")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
    except sqlite3.Error as e:
        raise DatabaseError(f"cannot read {path}: {e}") from None
    return Database(conn, "sqlite")


def _is_db_error(e: BaseException) -> bool:
    if isinstance(e, sqlite3.Error):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(e, psycopg.Error)


def placeholders(n: int) -> str:
    return ",".join("?" * n)
