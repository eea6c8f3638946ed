"""Issue 12: routing cells. Rows split over several supervisors by ImageID, one state DB, caps
divided; every guarantee of one supervisor held across cells, a cell killed outright included."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from conftest import (
    child_pids,
    engine_processes,
    kill_tree_on_failure,
    run_cli,
    shm_segments,
    start_cli,
    wait_gone,
    write_list,
)
from test_engine import RUN, assert_complete

from engine.cells import cell_config, cell_count
from engine.config import FetchConfig, OutputConfig, RunConfig
from engine.supervisor import cell_of

CELLS = [*RUN, "--cells", "2"]


def _cfg(**kw) -> RunConfig:  # noqa: ANN003
    fetch = FetchConfig(max_connections=kw.pop("conns", 512), max_host_connections=kw.pop("host", 16))
    return RunConfig(lists=(), output=OutputConfig(Path("o"), Path("o/db")), fetch=fetch, **kw)


def test_cells_divide_workers_and_caps_exactly() -> None:
    assert cell_count(_cfg(workers=2)) == 1  # the default at --procs 2: one supervisor, as before
    assert cell_count(_cfg(workers=16)) == 4
    assert cell_count(_cfg(workers=32, host=5)) == 5  # never more cells than the per-host cap
    cfg = _cfg(workers=17, host=10, conns=23, cells=4)
    parts = [cell_config(cfg, 4, k) for k in range(4)]
    assert sum(p.workers for p in parts) == 17
    assert sum(p.fetch.max_host_connections for p in parts) == 10
    assert sum(p.fetch.max_connections for p in parts) == 23
    assert min(p.fetch.max_host_connections for p in parts) >= 1
    # the partition is stable (the same in every run) and uses every cell
    keys = [f"{i:016x}" for i in range(2000)]
    assert [cell_of(k, 4) for k in keys] == [cell_of(k, 4) for k in keys]
    counts = [sum(1 for k in keys if cell_of(k, 4) == c) for c in range(4)]
    assert min(counts) > 400


def _slow(tmp_path: Path, items, server, rate: int, extra: list[str]) -> tuple[Path, Path, object]:
    lst = write_list(tmp_path / "images.csv", items, server.base_url, rate=str(rate))
    out = tmp_path / "out"
    return lst, out, start_cli([*CELLS, "--transfers", "3", *extra, lst, "--out", out])


def _wait_rows(out: Path, proc, n: int, timeout_s: float = 60.0) -> None:  # noqa: ANN001
    db = out / "oidl.sqlite"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if db.exists() and sqlite3.connect(db).execute("SELECT COUNT(*) FROM images").fetchone()[0] >= n:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.1)
    raise AssertionError("the run made no progress")


def test_cell_sigkill_mid_run_is_redone_exactly_once(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    lst, out, proc = _slow(tmp_path, items, server, 500_000, ["--ui", "plain"])
    try:
        _wait_rows(out, proc, 5)
        cells = child_pids(proc.pid, "oidl-cell")
        assert len(cells) == 2
        victim = psutil.Process(cells[0])
        its_children = [c.pid for c in victim.children(recursive=True)]
        assert its_children
        victim.kill()
        assert wait_gone(its_children) == [], "a dead cell's children must die with it"
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, err
        assert re.search(r"cell \d died", err)
        # the summary counts every row once, though the new cell skipped what the old one did
        m = re.search(r"(\d+) ok, (\d+) failed", err)
        assert m and (int(m[1]), int(m[2])) == (60, 3), err[-2000:]
    finally:
        kill_tree_on_failure(proc)
    assert_complete(out, items)
    assert not [n for n in shm_segments() if n.startswith(f"oidl-{proc.pid}-")]
    assert not engine_processes()


def test_graceful_sigint_then_resume_with_cells(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    items = items[:32]  # one broken among them; enough rows to stop mid-way
    lst, out, proc = _slow(tmp_path, items, server, 300_000, [])
    try:
        _wait_rows(out, proc, 3)
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        assert proc.returncode == 130, proc.stderr.read()
        assert wait_gone(children) == []
    finally:
        kill_tree_on_failure(proc)
    done = sqlite3.connect(out / "oidl.sqlite").execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert 0 < done < len(items)
    os.replace(write_list(tmp_path / "fast.csv", items, server.base_url), lst)
    p = run_cli([*CELLS, "--ui", "plain", lst, "--out", out], check=True)
    assert f"{done} already done" in p.stderr
    assert_complete(out, items)
    assert not engine_processes()


@pytest.mark.parametrize("cap", [3])
def test_per_host_cap_holds_across_cells(tmp_path: Path, corpus, server, cap: int) -> None:
    _, items = corpus
    items = items[:24]
    lst = write_list(tmp_path / "images.csv", items, server.base_url, rate="600000")
    out = tmp_path / "out"
    server.reset_stats()
    # 3 cells, 64 transfers each: without the division each would open `cap` connections
    run_cli([*RUN, "--procs", "3", "--cells", "3", "--transfers", "64", "--max-host-connections", str(cap),
             lst, "--out", out], check=True, timeout_s=180)
    per_host = server.stats()["max_concurrent_by_host"]
    assert per_host and max(per_host.values()) <= cap, per_host
    assert_complete(out, items)


def test_sigkill_main_takes_every_cell_and_segment_with_it(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    items = items[:32]  # one broken among them; enough rows to stop mid-way
    lst, out, proc = _slow(tmp_path, items, server, 400_000, [])
    try:
        _wait_rows(out, proc, 3)
        tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(child_pids(proc.pid, "oidl-cell")) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(tree) == [], "orphans after SIGKILL of the main process"
    finally:
        kill_tree_on_failure(proc)
    # every segment of the run is named after the process that made it (main or a cell)
    made = {f"oidl-{pid}-" for pid in (proc.pid, *tree)}
    deadline = time.monotonic() + 10  # the resource tracker unlinks once the last holder is gone
    while time.monotonic() < deadline and [n for n in shm_segments() if n[: n.rindex("-") + 1] in made]:
        time.sleep(0.2)
    assert not [n for n in shm_segments() if n[: n.rindex("-") + 1] in made]
    os.replace(write_list(tmp_path / "fast.csv", items, server.base_url), lst)
    run_cli([*CELLS, lst, "--out", out], check=True)
    assert_complete(out, items)
    assert not engine_processes()


def test_metrics_show_the_whole_run_across_cells(tmp_path: Path, corpus, server) -> None:
    import urllib.request

    from obs_run import start_run
    from prometheus_client.parser import text_string_to_metric_families

    _, items = corpus
    run = start_run(tmp_path, items, server, ["--metrics-port", "0", "--ui", "none", "--cells", "2"], ["metrics"],
                    rate_bps=400_000)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(run.urls["metrics"], timeout=5).read().decode()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            vals = {s.name + str(sorted(s.labels.items())): s.value for f in fams.values() for s in f.samples}
            if vals.get("oidl_images_total[('status', 'ok')]", 0) >= 10:
                break
            time.sleep(0.5)
        assert vals["oidl_images_expected[]"] == len(items)
        assert vals["oidl_images_total[('status', 'ok')]"] >= 10
        procs = {s.labels["process"] for s in fams["oidl_process_cpu_seconds"].samples}
        assert {"supervisor", "cell-0", "cell-1", "writer-0", "writer-1", "fetcher-0", "fetcher-1"} <= procs, procs
    finally:
        assert run.stop() in (0, 130)
