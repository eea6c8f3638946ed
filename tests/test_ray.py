"""Issue 12: ``run --ray`` on a REAL multi-node Ray cluster on this machine (ray.cluster_utils.Cluster).

One cluster for the module (starting one costs seconds): a head with no CPUs, so every shard runs on
a worker node, and two 1-CPU nodes. Lists of a few thousand tiny JPEGs served by the loopback server.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import CORPUS_CACHE, db_outputs, db_rows, kill_tree_on_failure, run_cli, start_cli

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402

import pyvips  # noqa: E402

from engine.corpus import CorpusItem, md5_b64, write_openimages_list  # noqa: E402
from engine.inputs import url_image_id  # noqa: E402
from engine.loopback import LoopbackServer  # noqa: E402

N_IMAGES = 2000
SHARD_ROWS = 400
#: Ray's object store per node; the smallest Ray accepts. Only small records pass through it.
STORE_BYTES = 80 * 1024 * 1024
RUN = ["--sizes", "16", "--ui", "plain", "--retry-base", "0.05", "--max-retries", "2",
       "--ray-shard-rows", str(SHARD_ROWS)]
RUN_TIMEOUT_S = 300.0


def _tiny_corpus(root: Path, n: int) -> list[CorpusItem]:
    """n distinct 32x24 JPEGs (~1 KB each: the test is about rows, not pixels) and 3 broken bodies."""
    done = root / f"complete-{n}"
    rng = np.random.default_rng(12)
    items = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n + 3):
        image_id = url_image_id(f"ray-test-{i}")
        rel = f"images/{image_id}.jpg"
        broken = None if i < n else ("html", "truncated", "empty")[i - n]
        if not done.exists():
            data = pyvips.Image.new_from_array(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
                                               interpretation="srgb").jpegsave_buffer(Q=80)
            data = {None: data, "html": b"<html><body>gone</body></html>", "truncated": data[: len(data) // 2],
                    "empty": b""}[broken]
            (root / rel).write_bytes(data)
        data = (root / rel).read_bytes()
        items.append(CorpusItem(image_id, rel, len(data), md5_b64(data), 32, 24, broken))
    done.touch()
    return items


@pytest.fixture(scope="module")
def corpus_and_server():
    root = CORPUS_CACHE / "ray-tiny"
    items = _tiny_corpus(root, N_IMAGES)
    with LoopbackServer(root) as server:
        yield items, server


def _retrying(start, tries: int = 3):  # noqa: ANN001, ANN202
    """Ray gives a node 30 s (hard-coded) to register: on a machine shared with other busy test
    runs that can run out, which says nothing about the code under test. Try again."""
    for attempt in range(tries):
        try:
            return start()
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for this
            if attempt == tries - 1:
                raise
            time.sleep(2)


def _add_node(c: Cluster):  # noqa: ANN202
    return _retrying(lambda: c.add_node(num_cpus=1, object_store_memory=STORE_BYTES))


@pytest.fixture(scope="module")
def cluster():
    c = _retrying(lambda: Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": STORE_BYTES, "include_dashboard": False}))
    try:
        nodes = [_add_node(c) for _ in range(2)]
        c.wait_for_nodes()
        c.workers = nodes  # the worker nodes still up, for the tests that remove or add one
        yield c
    finally:
        c.shutdown()


def _list(tmp_path: Path, items, server) -> Path:
    lst = tmp_path / "images.csv"
    write_openimages_list(lst, items, server.base_url)
    with lst.open("a", encoding="utf-8") as f:
        f.write("not-an-id,train,http://127.0.0.1:1/x.jpg,,,,,,,,\n")  # a bad row: the driver records it
    return lst


def _assert_exactly_once(out: Path, items) -> None:
    rows = db_rows(out / "oidl.sqlite")
    good = [i for i in items if i.broken is None]
    assert len(rows) == len(items) + 1  # + the bad row
    assert sum(1 for s, _ in rows.values() if s == "ok") == len(good)
    for it in good:
        assert rows[it.image_id] == ("ok", None), it
    for it in items:
        if it.broken:
            assert rows[it.image_id][0] == "failed" and rows[it.image_id][1] in {"not_an_image", "truncated", "empty"}
    assert [v for k, v in rows.items() if k.startswith("bad-row:")] == [("failed", "bad_id")]
    outs = db_outputs(out / "oidl.sqlite")
    assert len(outs) == len(good) and len({o[0] for o in outs}) == len(good)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "16").rglob("*") if p.is_file())
    assert files == sorted(rel for _, _, rel in outs)  # every file once, nothing else written
    assert not (out / ".oidl-tmp").exists()


def _wait_rows(out: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    db = out / "oidl.sqlite"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if db.exists() and len(db_rows(db)) >= n:
                return
        except Exception:  # noqa: BLE001 - the DB may be mid-creation
            pass
        time.sleep(0.2)
    raise AssertionError("the run made no progress")


def _finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree_on_failure(proc)
        raise
    assert proc.returncode == 0, err[-4000:]
    return err


def _per_node(stderr: str) -> dict[str, int]:
    return {m.group(1): int(m.group(3)) for m in re.finditer(r"node (\S+): (\d+) shards, (\d+) rows", stderr)}


def _engines_writing_to(out: Path) -> list[int]:
    """Engine processes (on any node of the test cluster: all on this machine) writing into ``out``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "engine.cli" in cmd and str(out) in cmd and "--ray" not in cmd:
            found.append(proc.pid)
    return found


def test_ray_run_interrupted_resumed_every_row_exactly_once(tmp_path: Path, cluster, corpus_and_server) -> None:
    items, server = corpus_and_server
    lst, out = _list(tmp_path, items, server), tmp_path / "out"
    # Ctrl-C mid-run: the shards in flight are cancelled, their engines die with them, exit 130
    proc = start_cli(["run", lst, "--out", out, "--ray", cluster.address, *RUN])
    try:
        _wait_rows(out, proc, SHARD_ROWS)
        deadline = time.monotonic() + 60
        while not _engines_writing_to(out):  # a shard's engine at work on a node right now
            assert time.monotonic() < deadline and proc.poll() is None, "no shard is running"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree_on_failure(proc)
    assert proc.returncode == 130, err[-3000:]
    before = set(db_rows(out / "oidl.sqlite"))
    done_before = len(before)
    assert SHARD_ROWS <= done_before < len(items)
    deadline = time.monotonic() + 20
    while _engines_writing_to(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _engines_writing_to(out), "an engine outlived its cancelled shard"
    # the same command again finishes the rest
    p = run_cli(["run", lst, "--out", out, "--ray", cluster.address, *RUN], timeout_s=RUN_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"{done_before} already done" in p.stderr
    _assert_exactly_once(out, items)
    shard_rows = {i for i in db_rows(out / "oidl.sqlite") if not i.startswith("bad-row:")} - before
    assert sum(_per_node(p.stderr).values()) == len(shard_rows)  # only the rest was sent to the nodes
    # results CSVs: the list's own columns, reasons for failures
    assert run_cli(["results", out]).returncode == 0
    ok_rows = list(csv.DictReader((out / "images-success.csv").open(encoding="utf-8")))
    bad_rows = list(csv.DictReader((out / "images-failure.csv").open(encoding="utf-8")))
    assert sorted(r["ImageID"] for r in ok_rows) == sorted(i.image_id for i in items if not i.broken)
    assert len(bad_rows) == 4 and all(r["reason"] for r in bad_rows)
    # resume: everything is finished, nothing is fetched or submitted again
    server.reset_stats()
    p = run_cli(["run", lst, "--out", out, "--ray", cluster.address, *RUN], timeout_s=RUN_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-4000:]
    assert server.stats()["total_requests"] == 0
    assert f"{len(items) + 1} already done" in p.stderr
    _assert_exactly_once(out, items)


def test_node_removed_mid_run(tmp_path: Path, cluster, corpus_and_server) -> None:
    items, server = corpus_and_server
    lst, out = _list(tmp_path, items, server), tmp_path / "out"
    proc = start_cli(["run", lst, "--out", out, "--ray", cluster.address, *RUN])
    try:
        _wait_rows(out, proc, SHARD_ROWS)  # the first shard is committed: both nodes are busy
        victim = cluster.workers.pop(0)
        cluster.remove_node(victim, allow_graceful=False)  # as a crash would
        err = _finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree_on_failure(proc)
    _assert_exactly_once(out, items)
    assert sum(_per_node(err).values()) == len(items)


def test_node_added_mid_run_takes_work(tmp_path: Path, cluster, corpus_and_server) -> None:
    items, server = corpus_and_server
    lst, out = _list(tmp_path, items, server), tmp_path / "out"
    while len(cluster.workers) > 1:  # start with one node (also when run alone)
        cluster.remove_node(cluster.workers.pop(), allow_graceful=False)
    proc = start_cli(["run", lst, "--out", out, "--ray", cluster.address, *RUN])
    try:
        _wait_rows(out, proc, 1)
        new = _add_node(cluster)
        cluster.workers.append(new)
        err = _finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree_on_failure(proc)
    _assert_exactly_once(out, items)
    per_node = _per_node(err)
    assert sum(per_node.values()) == len(items)
    assert any(name.endswith(new.node_id[:8]) and rows > 0 for name, rows in per_node.items()), err[-2000:]


def test_shard_failing_every_retry_fails_its_rows(tmp_path: Path, cluster, corpus_and_server, monkeypatch) -> None:
    """An engine that always exits with an error: the shard is retried, then its rows fail task_failed."""
    from engine.cli import build_parser, config_from_args
    from engine.dist.ray_run import RayConfig, run_on_ray

    items, server = corpus_and_server
    lst, out = tmp_path / "few.csv", tmp_path / "out"
    write_openimages_list(lst, items[:6], server.base_url)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    failing = (sys.executable, "-c", f"import os, sys; open(os.path.join({str(attempts)!r}, str(os.getpid())), 'w');"
               " print('simulated engine failure', file=sys.stderr); sys.exit(3)")
    cfg = config_from_args(build_parser().parse_args(["run", str(lst), "--out", str(out), "--ui", "none"]))
    code = run_on_ray(cfg, RayConfig(address=cluster.address, shard_rows=3, max_retries=1, engine_cmd=failing))
    assert code == 0
    rows = db_rows(out / "oidl.sqlite")
    assert rows == {i.image_id: ("failed", "task_failed") for i in items[:6]}
    assert len(list(attempts.iterdir())) == 4  # 2 shards x (1 try + 1 retry)
    detail = __import__("sqlite3").connect(out / "oidl.sqlite").execute("SELECT detail FROM images").fetchone()[0]
    assert "exited with code 3" in detail and "simulated engine failure" in detail


def test_missing_ray_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    lst = tmp_path / "urls.txt"
    lst.write_text("http://127.0.0.1:1/a.jpg\n")
    env = {"PYTHONPATH": str(fake.parent)}
    p = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(lst), "--out", str(tmp_path / "o"), "--ray"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, **env},
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2
    assert "pip install 'oidl-engine[ray]'" in p.stderr and "Traceback" not in p.stderr


def test_engine_options_reach_every_node_unchanged(tmp_path: Path) -> None:
    """The options forwarded to each shard's engine rebuild the same engine config as the driver's."""
    from engine.cli import build_parser, config_from_args, forwarded_args

    argv = ["run", "l.csv", "--out", str(tmp_path / "o"), "--sizes", "256", "--variant", "512:pad:webp",
            "--save-originals", "--background", "0,10,255", "--originals-dir", "rel/dir", "--procs", "3",
            "--limit", "5", "--ray", "--ray-shard-rows", "7", "--max-retries", "4", "--retry-base", "0.5",
            "--resolve", "a:80:127.0.0.1", "--resolve", "b:80:127.0.0.1", "--subset", "train"]
    a = build_parser().parse_args(argv)
    fwd = forwarded_args(a.run_parser, a)
    for driver_only in ("--out", "--procs", "--limit", "--ray", "--ray-shard-rows", "--ui", "--db"):
        assert driver_only not in fwd
    assert fwd[fwd.index("--originals-dir") + 1] == str(Path("rel/dir").absolute())
    node_argv = ["run", "shard.csv", "--out", str(tmp_path / "o"), "--procs", "3", *fwd]
    driver, node = config_from_args(a), config_from_args(build_parser().parse_args(node_argv))
    assert node.pipeline == driver.pipeline and node.fetch == driver.fetch and node.subset == driver.subset
    assert node.source.originals_dirs == tuple(p.absolute() for p in driver.source.originals_dirs)
    assert node.output.save_originals and node.workers == 3


def test_driver_stats_show_each_node(tmp_path: Path) -> None:
    """The rows a --ray driver fills per node reach the TUI and the exporter with the node's name."""
    from prometheus_client import generate_latest
    from rich.console import Console

    from engine.exporter import make_registry
    from engine.monitor import LiveData, _Holder
    from engine.stats import F, Stats
    from engine.tui import build

    stats = Stats.create(0, 4)
    try:
        data = LiveData(Stats.attach(stats.layout, None), tmp_path)
        data.row_names = {2: "10.0.0.1-aaaaaaaa", 3: "10.0.0.2-bbbbbbbb"}
        data.sample()
        stats.m[2, F.IMAGES_OK] += 300
        stats.m[3, F.IMAGES_OK] += 100
        stats.m[3, F.IMAGES_FAILED] += 2
        time.sleep(0.2)
        view = data.sample()
        nodes = {n["name"]: n for n in view["nodes"]}
        assert nodes["10.0.0.1-aaaaaaaa"]["ok"] == 300 and nodes["10.0.0.2-bbbbbbbb"]["failed"] == 2
        assert nodes["10.0.0.1-aaaaaaaa"]["images_per_s"] > nodes["10.0.0.2-bbbbbbbb"]["images_per_s"] > 0
        assert view["ok"] == 400  # the cluster's totals are the sum of the nodes
        console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(build(view, 50, 160))
        screen = console.export_text()
        assert "nodes (2)" in screen and "10.0.0.2-bbbbbbbb" in screen
        holder = _Holder()
        holder.data = data
        text = generate_latest(make_registry(holder)).decode()
        assert 'oidl_node_images_total{node="10.0.0.1-aaaaaaaa",status="ok"} 300.0' in text
        assert 'oidl_node_images_total{node="10.0.0.2-bbbbbbbb",status="failed"} 2.0' in text
        data.stats.close()
    finally:
        stats.close()


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lst = tmp_path / "urls.txt"
    lst.write_text("http://127.0.0.1:1/a.jpg\n")
    for address, says in ((f"127.0.0.1:{port}", "nothing answers at"), ("nonsense", "expected auto, local")):
        p = run_cli(["run", lst, "--out", tmp_path / "o", "--ray", address], timeout_s=60)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = run_cli(["run", lst, "--out", tmp_path / "o", "--ray-shard-rows", "5"], timeout_s=60)
    assert p.returncode == 2 and "--ray-shard-rows needs --ray" in p.stderr
