"""The benchmark harness's smoke mode: every scenario runs end to end and reports sane numbers.

This keeps ``bench/`` from rotting; it says nothing about the engine's speed (the corpus is
a few dozen images). img2dataset is left out: installing or starting it would dominate the
test's time, and the full runs compare against it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--smoke", "--no-img2dataset",
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    # nginx where it is installed, else the loopback fallback, which must say so.
    nginx = shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    assert result["server"] == ("nginx" if nginx else "loopback")
    assert ("server_note" in result) == (not nginx)
    scen = result["scenarios"]
    assert set(scen) == {"one-size", "three-sizes", "slow-hosts", "big-list", "fetch-only", "shards", "scale-out"}
    shards = scen["shards"]
    for run in (shards["engine"], *shards["files"].values()):
        assert run["returncode"] == 0 and run["rows"] == {"ok": shards["images"]}, run.get("stderr_tail")
    assert 0 < shards["ratios"]["webdataset_vs_files"] < 5

    for name in ("one-size", "three-sizes", "slow-hosts"):
        r = scen[name]
        sample = min(r["images"], result["config"]["ceiling_sample"])
        assert r["ceiling"]["images"] == sample and r["ceiling"]["failed"] == 0, name
        assert r["ceiling"]["images_per_s"] > 1, name
        eng = r["engine"]
        assert eng["returncode"] == 0, (name, eng.get("stderr_tail"))
        assert eng["rows"] == {"ok": r["images"]}, (name, eng.get("failure_reasons"))
        assert 0 < eng["wall_s"] < 60 and eng["images_per_s"] > 0, name
        assert eng["cpu_ms_per_image"] > 0, name
        # Supervisor, fetcher, writer and two workers at least, all sampled.
        assert eng["peak_procs"] >= 5 and 50 < eng["peak_rss_mib"] < 4096, name
        assert {"oidl-fetcher", "oidl-worker", "oidl-writer"} <= set(eng["cpu_s_by_role"]), name
        assert 0 < r["ratios"]["engine_vs_ceiling"] < 5, name
    assert scen["one-size"]["ceiling_thumbnail"]["images_per_s"] > 1
    for name in ("one-size", "three-sizes"):  # the fastest library pipelines and the pyvips-only ceiling
        r = scen[name]
        for ceiling in (r["ceiling_pyvips"], *r["fastest_recipes"].values()):
            assert ceiling["images"] == r["ceiling"]["images"] and ceiling["failed"] == 0, (name, ceiling)
            assert ceiling["images_per_s"] > 1, (name, ceiling)
        assert r["fastest"]["mode"] in ("fastest-turbo", "fastest-opencv")
        assert 0 < r["ratios"]["engine_vs_fastest"] < 5 and 0 < r["ratios"]["engine_vs_pyvips_ceiling"] < 10, name

    big = scen["big-list"]
    assert big["rows"] == 20_000
    assert big["engine"]["images"] > 0, big["engine"].get("stderr_tail")
    assert 0 < big["engine"]["first_done_s"] < big["run_window_s"]
    assert big["memory"]["rss_first_half_mib"] > 50

    fetch = scen["fetch-only"]
    assert fetch["engine"]["rows"] == {"ok": fetch["images"]}, fetch["engine"].get("failure_reasons")
    assert fetch["engine"]["requests_per_s_per_fetcher"] > 0
    assert fetch["network_ceiling"]["requests_per_s"] > 0

    scale = scen["scale-out"]
    low, high = (scale["runs"][str(p)] for p in scale["procs"])
    for run in (low, high):
        assert run["returncode"] == 0 and run["rows"] == {"ok": scale["images"]}, run.get("stderr_tail")
        assert run["steady_state"]["images"] > 0 and run["steady_state"]["kinds"]["oidl-worker"]["processes"] >= 2
    # the high --procs run is split into routing cells; the main process routes no rows
    assert high["steady_state"]["kinds"]["oidl-cell"]["processes"] == 2
    assert "oidl-cell" not in scale["single_process_kinds"] and "oidl-worker" not in scale["single_process_kinds"]
    assert scale["ratios"]["steady_high_vs_low"] > 0

    assert 0 < result["peak_rss_mib"] < 4096
    assert "| one-size | engine / ceiling |" in result["table"]
    assert "| three-sizes | engine / fastest pipeline, whole run |" in result["table"]


def test_steady_state_counts_processes_that_exit_inside_the_window() -> None:
    """On a short run the workers can be gone when the last rows commit: they still count."""
    from bench.measure import steady_state

    progress = [
        (0.0, 0, {1: ("oidl-engine", 0.1), 2: ("oidl-worker-0", 0.0)}),
        (1.0, 20, {1: ("oidl-engine", 0.2), 2: ("oidl-worker-0", 0.5)}),
        (2.0, 60, {1: ("oidl-engine", 0.3), 2: ("oidl-worker-0", 1.3)}),
        (3.0, 100, {1: ("oidl-engine", 0.4)}),  # the worker has exited
    ]
    s = steady_state(progress, 100)
    assert s is not None and s["images"] == 80
    assert s["kinds"]["oidl-worker"]["processes"] == 1
    assert s["kinds"]["oidl-worker"]["max_ms_per_image"] == round(1000 * (1.3 - 0.5) / 80, 3)
