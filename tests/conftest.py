"""Shared fixtures: a real loopback HTTP server over a generated corpus, and the real CLI."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import psutil
import pytest

from engine.corpus import CorpusItem, make_corpus, write_openimages_list
from engine.loopback import LoopbackServer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "engine.cli"]
#: corpora are cached across tests (and runs) here: generating images is the slow part
CORPUS_CACHE = Path(os.environ.get("OIDL_TEST_CACHE", "/tmp/oidl-test-corpora"))


@pytest.fixture(scope="session")
def corpus() -> tuple[Path, list[CorpusItem]]:
    """60 photo-like JPEGs (a few large) and 3 broken files."""
    root = CORPUS_CACHE / "e2e-60"
    items = make_corpus(root, 63, seed=7, broken=3, large_fraction=0.05)
    return root, items


@pytest.fixture(scope="session")
def server(corpus: tuple[Path, list[CorpusItem]]) -> Iterator[LoopbackServer]:
    with LoopbackServer(corpus[0]) as s:
        yield s


#: marks every engine process this test session starts (other engines may run on the machine)
SESSION_MARK = f"OIDL_TEST_SESSION={uuid.uuid4().hex}"
_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # loopback only, never via a proxy
_ENV[SESSION_MARK.split("=")[0]] = SESSION_MARK.split("=")[1]


def run_cli(args: Sequence[str], *, timeout_s: float = 120.0, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=_ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def start_cli(args: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_ENV
    )


def db_rows(db: Path) -> dict[str, tuple[str, str | None]]:
    conn = sqlite3.connect(db)
    try:
        return {i: (s, r) for i, s, r in conn.execute("SELECT image_id, status, reason FROM images")}
    finally:
        conn.close()


def db_outputs(db: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute("SELECT image_id, variant, path FROM outputs"))
    finally:
        conn.close()


def write_list(path: Path, items: Sequence[CorpusItem], base_url: str, **params: str) -> Path:
    """An Open Images list; extra query parameters make the server misbehave per row."""
    write_openimages_list(path, items, base_url)
    if params:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
        for r in rows[1:]:
            r[2] = f"{r[2]}?{q}&k={r[0]}"
        with path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    return path


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("oidl-")}


def comm(pid: int) -> str:
    """The kernel's process name (children set it to oidl-<role>-<n>); psutil may report 'python'."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def engine_processes() -> list[int]:
    """Engine processes started by this test session that are still alive (orphans)."""
    mark = SESSION_MARK.encode()
    out = []
    for pid in psutil.pids():
        if pid == os.getpid() or not comm(pid).startswith("oidl-"):
            continue
        try:
            if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                out.append(pid)
        except OSError:
            pass
    return out


def child_pids(pid: int, prefix: str) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True) if comm(c.pid).startswith(prefix)]
    except psutil.Error:
        return []


def wait_gone(pids: Sequence[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


def md5_b64_of(path: Path) -> str:
    import base64

    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def kill_tree_on_failure(proc: subprocess.Popen) -> None:
    try:
        for c in psutil.Process(proc.pid).children(recursive=True):
            c.kill()
    except psutil.Error:
        pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="session")
def postgres():  # noqa: ANN201 - tests.pg.PostgresServer
    """A real PostgreSQL server for the whole session (tests/pg.py); ``postgres.new_database()``."""
    from pg import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql (scripts/test does)")
    with PostgresServer(bindir) as server:
        yield server
