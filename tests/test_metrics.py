"""Issue 5: the board, the exporter's names and values, and /metrics of a live run."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics as M
from engine.board import FINISHED_RING, HANDED_PER_FETCHER, TRANSFERS_PER_FETCHER, Board
from engine.errors import ALL_REASONS
from engine.exporter import make_registry
from engine.monitor import LiveData, _Holder
from engine.state import OutputRow
from engine.stats import HIST_DOWNLOAD_BASE, HIST_PROCESS_BASE, F, Role, Stats, StatsLayout
from obs_run import check_first_scrape, families, start_run


@pytest.fixture
def stats():
    s = Stats.create(2, 2)
    yield s
    s.close()


def _attempt(seq: int, url: str, nbytes: int, total: int) -> SimpleNamespace:
    return SimpleNamespace(job=SimpleNamespace(seq=seq, url=url), nbytes=nbytes, total=total,
                           t_start=time.monotonic() - seq)


def _row(image_id: str, status: str, reason: str | None = None, outputs=()) -> SimpleNamespace:
    return SimpleNamespace(image_id=image_id, status=status, reason=reason, detail=f"detail of {image_id}",
                           nbytes=1000, width=640, height=480, outputs=outputs)


def test_board_round_trip(stats: Stats) -> None:
    board = Board.of(stats)
    fb = board.fetcher(1)
    attempts = [_attempt(i, f"http://h/p/img{i}.jpg?x=1", 50 * i, 100 * i if i % 2 else -1) for i in range(1, 6)]
    fb.publish(attempts, time.monotonic())
    got = board.read_transfers()
    assert [t["name"] for t in got] == [f"img{i}.jpg" for i in range(5, 0, -1)]  # oldest first
    assert {t["fetcher"] for t in got} == {1}
    by = {t["name"]: t for t in got}
    assert by["img3.jpg"]["pct"] == pytest.approx(50.0) and by["img3.jpg"]["total"] == 300
    assert by["img2.jpg"]["pct"] is None  # no Content-Length
    # rate-limited: an immediate second publish changes nothing; a later one does
    fb.publish(attempts[:1], time.monotonic())
    assert len(board.read_transfers()) == 5
    fb.publish(attempts[:1], time.monotonic() + 10)
    assert [t["name"] for t in board.read_transfers()] == ["img1.jpg"]
    # more transfers than listed: only the first TRANSFERS_PER_FETCHER appear
    many = [_attempt(i, f"http://h/{i}.jpg", 1, 2) for i in range(1, TRANSFERS_PER_FETCHER + 20)]
    fb.publish(many, time.monotonic() + 20)
    assert len(board.read_transfers()) == TRANSFERS_PER_FETCHER

    # a worker's image is named through the fetcher's ring of bodies handed on
    fb.handed_on(77, "http://h/p/cat.jpg")
    wb = board.worker(1)
    wb.start(77, 1234, time.monotonic())
    assert board.read_resizes() == [{"worker": 1, "name": "cat.jpg", "bytes": 1234, "age_s": pytest.approx(0, abs=1)}]
    wb.idle()
    assert board.read_resizes() == []
    for k in range(HANDED_PER_FETCHER + 1):  # the ring wraps: an old seq is no longer named
        fb.handed_on(1000 + k, f"http://h/{k}.jpg")
    wb.start(77, 1, time.monotonic())
    assert board.read_resizes()[0]["name"] == "#77"


def test_board_finished_rings(stats: Stats) -> None:
    board = Board.of(stats)
    wr = board.writer()
    outs = (OutputRow("original", "original/abc/abc1.jpg", 10, 1, 1), OutputRow("512", "512/abc/abc1.jpg", 5, 1, 1),
            OutputRow("128", "128/abc/abc1.jpg", 2, 1, 1))
    rows = [_row(f"id{i}", "ok", outputs=outs) for i in range(FINISHED_RING + 30)]
    rows += [_row("bad1", "failed", "http_404"), _row("bad2", "failed", "corrupt")]
    wr.finished(rows, time.time())
    ok = board.read_finished(True)
    assert len(ok) == 100 and ok[0]["name"] == f"id{FINISHED_RING + 29}"  # newest first, last 100
    assert ok[0]["text"] == "128/abc/abc1.jpg"  # the smallest variant, never the original
    assert board.read_finished(True, limit=1000)[-1]["name"] == "id30"  # the ring keeps FINISHED_RING
    failed = board.read_finished(False)
    assert [(r["name"], r["reason"]) for r in failed] == [("bad2", "corrupt"), ("bad1", "http_404")]
    assert failed[0]["text"] == "detail of bad2"


def _scrape(stats: Stats, tmp_path: Path) -> dict:
    holder = _Holder()
    holder.data = LiveData(stats, tmp_path)
    holder.data.sample()
    text = generate_latest(make_registry(holder)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def test_exporter_names_and_values(stats: Stats, tmp_path: Path) -> None:
    w = Stats.attach(stats.layout, Role.WRITER)
    f0 = Stats.attach(stats.layout, Role.FETCHER, 0)
    k1 = Stats.attach(stats.layout, Role.WORKER, 1)
    try:
        w.add(F.IMAGES_OK, 7)
        w.add(F.IMAGES_FAILED, 2)
        w.failed("http_404")
        w.failed("http_404")
        w.add(F.WRITTEN_BYTES, 5000)
        f0.add(F.DOWNLOADED_BYTES, 9000)
        f0.set(F.DOWNLOADS_IN_PROGRESS, 3)
        f0.set(F.OWNED_SLOTS, 100)
        f0.set(F.FREE_SLOTS, 75)
        f0.observe(HIST_DOWNLOAD_BASE, 0.3)
        f0.observe(HIST_DOWNLOAD_BASE, 100.0)
        k1.set(F.RESIZES_IN_PROGRESS, 1)
        k1.observe(HIST_PROCESS_BASE, 0.02)
        stats.set(F.EXPECTED, 50)
        fams, text = _scrape(stats, tmp_path)
    finally:
        for s in (w, f0, k1):
            s.close()
    for name in M.REQUIRED:
        assert name in text, name
    # the parser strips _total from counter family names
    def samples(metric: M.Metric) -> dict:
        fam = fams[metric.name.removesuffix("_total") if metric.kind == "counter" else metric.name]
        return {tuple(sorted(s.labels.items())): s.value for s in fam.samples if not s.name.endswith("_created")}

    assert samples(M.IMAGES) == {(("status", "ok"),): 7, (("status", "failed"),): 2}
    assert samples(M.IMAGES_EXPECTED) == {(): 50}
    assert samples(M.DOWNLOADED_BYTES) == {(): 9000}
    assert samples(M.WRITTEN_BYTES) == {(): 5000}
    assert samples(M.DOWNLOADS_IN_PROGRESS) == {(): 3}
    assert samples(M.RESIZES_IN_PROGRESS) == {(): 1}
    failures = samples(M.FAILURES)
    assert {dict(k)["reason"] for k in failures} == set(ALL_REASONS)  # the fixed label set, zeros included
    assert failures[(("reason", "http_404"),)] == 2
    hist = {s.labels.get("le"): s.value for s in fams[M.DOWNLOAD_SECONDS.name].samples if s.name.endswith("_bucket")}
    assert hist["0.25"] == 0 and hist["0.5"] == 1 and hist["60.0"] == 1 and hist["+Inf"] == 2
    # every ring from the start: 0 until its process publishes its slots
    assert samples(M.RING_USED_SLOTS) == {(("process", "fetcher-0"), ("ring", "fetch")): 25,
                                          (("process", "fetcher-1"), ("ring", "fetch")): 0,
                                          (("process", "worker-0"), ("ring", "output")): 0,
                                          (("process", "worker-1"), ("ring", "output")): 0}
    assert samples(M.RING_SLOTS)[(("process", "fetcher-0"), ("ring", "fetch"))] == 100
    procs = {dict(k)["process"] for k in samples(M.PROCESS_RSS)}
    assert {"supervisor", "monitor", "writer", "fetcher-0", "worker-1"} <= procs
    # every metric defined in engine.metrics is exposed
    for metric in M.ALL:
        key = metric.name if metric.kind != "counter" else metric.name.removesuffix("_total")
        assert key in fams, metric.name


def test_expected_hidden_while_counting(stats: Stats, tmp_path: Path) -> None:
    fams, _ = _scrape(stats, tmp_path)
    assert not fams[M.IMAGES_EXPECTED.name].samples  # -1 means "still counting": no sample beats a wrong one


def test_every_family_before_the_run_starts() -> None:
    # What the monitor process serves before the supervisor has handed over its stats.
    holder = _Holder(StatsLayout("", fetchers=2, workers=3))
    text = generate_latest(make_registry(holder)).decode()
    check_first_scrape(text, 2, 3)
    fams = families(text)
    assert set(fams[M.RING_USED_SLOTS.name].values()) == set(fams[M.RING_SLOTS.name].values()) == {0}
    assert fams[M.IMAGES.name] == {(("status", "failed"),): 0, (("status", "ok"),): 0}


def test_live_metrics_endpoint(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    run = start_run(tmp_path, items, server, ["--metrics-port", "0", "--ui", "none"], ["metrics"], rate_bps=400_000)
    try:
        url = run.urls["metrics"]
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        seen: list[dict] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            vals = {s.name + str(sorted(s.labels.items())): s.value for f in fams.values() for s in f.samples}
            seen.append(vals)
            if vals.get("oidl_images_total[('status', 'ok')]", 0) >= 10:
                break
            time.sleep(0.5)
        last = seen[-1]
        assert last["oidl_images_expected[]"] == len(items)
        assert last["oidl_images_total[('status', 'ok')]"] >= 10
        assert last["oidl_downloaded_bytes_total[]"] > 0 and last["oidl_written_bytes_total[]"] > 0
        assert max(v.get("oidl_downloads_in_progress[]", 0) for v in seen) >= 1
        assert last["oidl_download_duration_seconds_count[]"] >= 10
    finally:
        assert run.stop() in (0, 130)
