"""Issue 5: every Grafana panel's query returns data from a REAL Prometheus scraping a live run."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from engine import metrics as M
from obs_run import start_run

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "grafana" / "dashboards" / "oidl-engine.json"
#: Grafana's variables, as Grafana would expand them for a 1 s scrape interval
#: ($instance: the dashboard's "All", which Grafana sends as the variable's allValue)
GRAFANA_VARS = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1m", "$instance": ".*"}


def _panel_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def test_dashboard_covers_the_required_metrics() -> None:
    exprs = " ".join(e for _, e in _panel_queries())
    for name in M.REQUIRED:
        assert name in exprs, f"no panel shows {name}"
    for needed in ("oidl_failures_total", "oidl_download_duration_seconds_bucket",
                   "oidl_processing_duration_seconds_bucket", "oidl_ring_used_slots", "oidl_retries_total",
                   "oidl_process_cpu_seconds_total", "oidl_process_resident_memory_bytes", "oidl_rows_waiting"):
        assert needed in exprs, f"no panel shows {needed}"
    dash = json.loads(DASHBOARD.read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    # one exporter per node (--ray-node-metrics-port) and the driver's: every query can pick instances
    assert "instance" in {v["name"] for v in dash["templating"]["list"]}
    for title, expr in _panel_queries():
        for name in re.findall(r"\b(oidl_[a-z_]+)", expr):
            assert re.search(name + r'\{instance=~"\$instance"', expr), f"{title}: {name} ignores $instance"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


@pytest.mark.timeout(180)
def test_every_panel_returns_data_from_real_prometheus(tmp_path: Path, corpus, server) -> None:
    binary = shutil.which("prometheus") or next(
        (p for p in ("/usr/bin/prometheus", "/usr/local/bin/prometheus") if Path(p).exists()), None)
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install -y prometheus)")
    _, items = corpus
    run = start_run(tmp_path, items, server, ["--metrics-port", "0", "--ui", "none"], ["metrics"])
    prom = None
    try:
        target = urllib.parse.urlsplit(run.urls["metrics"]).netloc
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: oidl-engine\n    static_configs:\n      - targets: ['{target}']\n"
        )
        port = _free_port()
        prom = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
        )
        api = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 60
        up = False
        while time.monotonic() < deadline:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                r = _get(f"{api}/query?query=" + urllib.parse.quote('count_over_time(up{job="oidl-engine"}[1m])'))
                res = r["data"]["result"]
                if res and float(res[0]["value"][1]) >= 12:  # 12 scrapes: every rate window has samples
                    up = True
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert up, "Prometheus never scraped the engine"
        assert run.proc.poll() is None, "the run ended before the panels could be checked; slow it down"
        failures = []
        for title, expr in _panel_queries():
            q = expr
            for k, v in GRAFANA_VARS.items():
                q = q.replace(k, v)
            try:
                r = _get(f"{api}/query?query=" + urllib.parse.quote(q))
            except urllib.error.HTTPError as e:
                failures.append(f"{title}: {q}: HTTP {e.code} {e.read()[:300]!r}")
                continue
            if r.get("status") != "success":
                failures.append(f"{title}: {q}: {r}")
            elif not r["data"]["result"]:
                failures.append(f"{title}: {q}: no data")
        assert not failures, "\n".join(failures)
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(20)
        assert run.stop() in (0, 130)
