"""Helpers of the observability tests: a slow real run whose monitor URLs we can read."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

from conftest import CLI, REPO, kill_tree_on_failure, write_list
from engine import metrics as M
from engine.errors import ALL_REASONS

#: per-connection body rate and connection cap that make the 63-image corpus take ~30 s
SLOW_RATE_BPS = 100_000
SLOW_HOST_CONNECTIONS = 2


class Run:
    """A running ``oidl-engine run`` with --metrics-port / --web-port 0; stderr is drained."""

    def __init__(self, proc: subprocess.Popen, urls: dict[str, str]) -> None:
        self.proc = proc
        self.urls = urls
        self.stderr: list[str] = []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_tree_on_failure(self.proc)
        return self.proc.returncode


def start_run(tmp_path: Path, items, server, extra: Sequence[str], want: Sequence[str],
              rate_bps: int = SLOW_RATE_BPS, rotations: Mapping[str, int] | None = None) -> Run:
    lst = write_list(tmp_path / "slow.csv", items, server.base_url, rate=str(rate_bps))
    if rotations is not None:  # a V4+ list: the Rotation column, 0 where not given
        rows = list(csv.reader(lst.open(newline="", encoding="utf-8")))
        rows[0].append("Rotation")
        for r in rows[1:]:
            r.append(str(rotations.get(r[0], 0)))
        with lst.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    return launch(["run", str(lst), "--out", str(tmp_path / "out"), "--sizes", "128,256", "--procs", "2",
                   "--max-host-connections", str(SLOW_HOST_CONNECTIONS), *extra], want)


def launch(args: Sequence[str], want: Sequence[str]) -> Run:
    """Start ``oidl-engine ARGS`` and wait until it has printed the URLs named in ``want``."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    urls: dict[str, str] = {}
    run = Run(proc, urls)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while set(want) - set(urls):
        line = proc.stderr.readline()
        if not line or time.monotonic() > deadline:
            kill_tree_on_failure(proc)
            raise AssertionError(f"the engine did not print its URLs: {line!r}")
        run.stderr.append(line)
        m = re.search(r"oidl-engine: (\w+) on (\S+)", line)
        if m:
            urls[m.group(1)] = m.group(2)

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            run.stderr.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return run


def families(text: str) -> dict[str, dict[tuple, float]]:
    """{metric name as defined in engine.metrics: {sorted label items: value}} of a scrape."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = {tuple(sorted(s.labels.items())): s.value for s in fam.samples
                     if not s.name.endswith("_created")}
    return out


def check_first_scrape(text: str, fetchers: int, workers: int) -> None:
    """Every metric family is in the scrape, with its series for every process of the run."""
    fams = families(text)
    for metric in M.ALL:
        assert metric.name in fams, f"{metric.name} missing from the first scrape"
        # every family has its series at once, except a row total nobody has counted yet
        assert fams[metric.name] or metric is M.IMAGES_EXPECTED, f"{metric.name} has no series"
    children = [("fetch", f"fetcher-{i}") for i in range(fetchers)] + [("output", f"worker-{j}") for j in range(workers)]
    for metric in (M.RING_SLOTS, M.RING_USED_SLOTS):
        assert {(dict(k)["ring"], dict(k)["process"]) for k in fams[metric.name]} == set(children), metric.name
    assert {dict(k)["reason"] for k in fams[M.FAILURES.name]} == set(ALL_REASONS)
    assert {"supervisor", "monitor"} <= {dict(k)["process"] for k in fams[M.PROCESS_RSS.name]}
    beats = {dict(k)["process"] for k in fams[M.HEARTBEAT_AGE.name]}
    assert {"supervisor", "writer", *(p for _, p in children)} <= beats

