"""A run's edges: several lists when one of them breaks, and no process left behind while it runs."""

from __future__ import annotations

import csv
import gzip
import multiprocessing as mp
import io
import random
import sqlite3
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from conftest import comm, db_rows, run_cli, write_list
from engine import state
from engine.cli import EXIT_INCOMPLETE
from engine.stats import F, Stats
from engine.supervisor import count_main
from obs_run import check_first_scrape, start_run


def _cut_gz_list(path: Path, items, base_url: str) -> Path:
    """A gzipped list cut off two thirds in, as a download that stopped part-way leaves it.

    Long, incompressible titles: the list is read well past its first 64 KiB (where its
    format is recognised) before it breaks, as a real 9M-row list would be.
    """
    rng = random.Random(14)
    records = list(csv.reader(write_list(path.with_suffix(""), items, base_url).open(newline="")))
    for record in records[1:]:
        record[7] = rng.randbytes(8192).hex()
    text = io.StringIO()
    csv.writer(text).writerows(records)
    whole = gzip.compress(text.getvalue().encode())
    path.write_bytes(whole[: len(whole) * 2 // 3])
    return path


def test_a_broken_list_does_not_stop_the_others(tmp_path: Path, corpus, server) -> None:
    # small, good images only: what is under test is the reading of the lists
    items = [i for i in corpus[1] if i.broken is None and i.size < 400_000][:18]
    first, second, third = items[:4], items[4:14], items[14:]
    a = write_list(tmp_path / "a.csv", first, server.base_url)
    b = _cut_gz_list(tmp_path / "b.csv.gz", second, server.base_url)
    c = write_list(tmp_path / "c.csv", third, server.base_url)
    out = tmp_path / "out"
    p = run_cli(["run", a, b, c, "--out", out, "--sizes", "64", "--procs", "2", "--ui", "plain",
                 "--max-retries", "1", "--retry-base", "0.05"])
    assert p.returncode == EXIT_INCOMPLETE, p.stderr

    rows = db_rows(out / "oidl.sqlite")
    assert {i.image_id for i in first} <= set(rows)
    assert {i.image_id for i in third} <= set(rows), "the list after the broken one was not read"
    read_of_b = [i for i in second if i.image_id in rows]
    assert 0 < len(read_of_b) < len(second)
    assert read_of_b == second[: len(read_of_b)]  # its rows before the break, in order

    conn = sqlite3.connect(out / "oidl.sqlite")
    try:
        lists = {Path(path).name: (reason, line, detail) for path, reason, line, detail in conn.execute(
            "SELECT path, error_reason, error_line, error_detail FROM lists")}
    finally:
        conn.close()
    assert lists["a.csv"] == lists["c.csv"] == (None, None, None)
    reason, line, detail = lists["b.csv.gz"]
    assert reason == "truncated" and line == len(read_of_b) + 1 and detail  # header + its rows
    # the log and the summary both name the file, the line and the reason
    log_lines = [x for x in p.stderr.splitlines() if "ERROR" in x]
    assert any(f"{b}: unreadable after line {line}: truncated" in x for x in log_lines), p.stderr
    summary = p.stderr[p.stderr.index("incomplete in"):]
    assert f"{b}: unreadable after line {line}: truncated" in summary and "could not be read to the end" in summary


def test_rows_are_counted_past_a_broken_list(tmp_path: Path, corpus, server) -> None:
    # the progress total and ETA still work: the counter counts the lists that can be counted
    items = corpus[1]
    a = write_list(tmp_path / "a.csv", items[:7], server.base_url)
    b = _cut_gz_list(tmp_path / "b.csv.gz", items[20:30], server.base_url)
    c = write_list(tmp_path / "c.csv", items[7:12], server.base_url)
    stats = Stats.create(1, 1)
    try:
        counter = mp.get_context("spawn").Process(target=count_main, args=((str(a), str(b), str(c)), None, None,
                                                                           stats.layout))
        counter.start()
        counter.join(60)
        assert counter.exitcode == 0
        assert stats.m[0, F.EXPECTED] == 12
    finally:
        stats.close()


#: the state DB as version 1 made it, before lists had error columns
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE lists (list_id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, columns TEXT NOT NULL);
CREATE TABLE images (image_id TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), reason TEXT,
    detail TEXT, url TEXT, bytes INTEGER, md5 TEXT, width INTEGER, height INTEGER, format TEXT, attempts INTEGER,
    list_id INTEGER REFERENCES lists(list_id), line INTEGER, fields TEXT, updated_at REAL NOT NULL);
CREATE TABLE outputs (image_id TEXT NOT NULL, variant TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL,
    width INTEGER, height INTEGER, PRIMARY KEY (image_id, variant));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO lists VALUES (1, '/data/images.csv', 'openimages', '["ImageID"]');
INSERT INTO images(image_id, status, list_id, line, updated_at) VALUES ('000002b66c9c498e', 'ok', 1, 2, 0);
"""


def test_a_version_1_state_db_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "oidl.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(_V1_SCHEMA)
    conn.close()
    state.init(db)
    state.init(db)  # twice: nothing to do the second time
    conn = state.connect(db)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(state.SCHEMA_VERSION),)
        assert state.finished_ids(conn, ["000002b66c9c498e"], include_failed=True) == {"000002b66c9c498e"}
        list_id = state.register_list(conn, "/data/images.csv", "openimages", ["ImageID"])
        assert list_id == 1
        state.list_broken(conn, list_id, "truncated", 7, "Compressed file ended")
        assert conn.execute("SELECT error_reason, error_line FROM lists").fetchall() == [("truncated", 7)]
        state.register_list(conn, "/data/images.csv", "openimages", ["ImageID"])  # the next run reads it afresh
        assert conn.execute("SELECT error_reason, error_line FROM lists").fetchall() == [(None, None)]
    finally:
        conn.close()


def test_live_run_every_metric_at_once_and_no_zombie(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    run = start_run(tmp_path, items, server, ["--metrics-port", "0", "--ui", "none"], ["metrics"])
    try:
        # at once, as a Prometheus that starts with the run would: children not even started
        check_first_scrape(urllib.request.urlopen(run.urls["metrics"], timeout=5).read().decode(), 1, 2)
        # the row-counting process has done its work once the total is exported
        deadline = time.monotonic() + 30
        while True:
            text = urllib.request.urlopen(run.urls["metrics"], timeout=5).read().decode()
            if any(f.name == "oidl_images_expected" and f.samples for f in text_string_to_metric_families(text)):
                break
            assert time.monotonic() < deadline, "the lists were never counted"
            time.sleep(0.2)
        # it exits right after; the supervisor must reap it then, not leave it <defunct> for the run
        deadline = time.monotonic() + 10
        while True:
            kids = psutil.Process(run.proc.pid).children(recursive=True)
            counter = [c for c in kids if comm(c.pid) == "oidl-counter"]
            if not counter:
                break
            assert time.monotonic() < deadline, f"the row counter is still there: {counter[0].status()}"
            time.sleep(0.2)
        assert run.proc.poll() is None, "the run ended too soon to tell"
        zombies = [(c.pid, comm(c.pid)) for c in kids if c.status() == psutil.STATUS_ZOMBIE]
        assert not zombies, zombies
    finally:
        assert run.stop() in (0, 130)
