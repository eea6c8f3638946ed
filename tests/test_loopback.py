"""The loopback test server (engine/loopback.py) over real HTTP, and the corpus generator (engine/corpus.py)."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import pycurl
import pytest
import pyvips

from engine.corpus import CorpusItem, make_corpus, photo_like_jpeg, write_openimages_list
from engine.loopback import PLACEHOLDER_PNG, LoopbackError, LoopbackServer

REPO = Path(__file__).resolve().parents[1]
SMALL = bytes(range(256)) * 80  # 20,480 bytes with position-dependent content, so ranges are checkable


# -- a small real client ----------------------------------------------------------------------


@dataclass
class Got:
    status: int
    headers: dict[str, str]  # lower-case names, of the last response
    body: bytes
    err: int  # pycurl error number, 0 = complete transfer
    elapsed_s: float
    effective_url: str
    redirects: int
    connects: int
    all_headers: list[str] = field(default_factory=list)


def fetch(
    url: str,
    *,
    head: bool = False,
    headers: tuple[str, ...] = (),
    follow: bool = False,
    maxredirs: int = 10,
    timeout_s: float = 10.0,
    curl: pycurl.Curl | None = None,
    low_speed_s: int = 0,
) -> Got:
    c = curl or pycurl.Curl()
    buf = io.BytesIO()
    lines: list[str] = []
    c.setopt(pycurl.URL, url)
    c.setopt(pycurl.NOSIGNAL, 1)
    c.setopt(pycurl.PROXY, "")  # never a proxy from the environment
    c.setopt(pycurl.TIMEOUT_MS, int(timeout_s * 1000))
    c.setopt(pycurl.WRITEDATA, buf)
    c.setopt(pycurl.HEADERFUNCTION, lambda h: lines.append(h.decode("latin-1")))
    c.setopt(pycurl.NOBODY, 1 if head else 0)
    c.setopt(pycurl.HTTPHEADER, list(headers))
    c.setopt(pycurl.FOLLOWLOCATION, 1 if follow else 0)
    c.setopt(pycurl.MAXREDIRS, maxredirs)
    if low_speed_s:
        # libcurl averages speed over the last ~5 s, so the limit must exceed the 1 KiB burst / 1 s
        c.setopt(pycurl.LOW_SPEED_LIMIT, 2000)
        c.setopt(pycurl.LOW_SPEED_TIME, low_speed_s)
    t0 = time.monotonic()
    try:
        c.perform()
        err = 0
    except pycurl.error as exc:
        err = exc.args[0]
    elapsed = time.monotonic() - t0
    last: dict[str, str] = {}
    for line in lines:
        if line.startswith("HTTP/"):
            last = {}
        elif ":" in line:
            k, v = line.split(":", 1)
            last[k.strip().lower()] = v.strip()
    got = Got(
        status=c.getinfo(pycurl.RESPONSE_CODE),
        headers=last,
        body=buf.getvalue(),
        err=err,
        elapsed_s=elapsed,
        effective_url=c.getinfo(pycurl.EFFECTIVE_URL),
        redirects=c.getinfo(pycurl.REDIRECT_COUNT),
        connects=c.getinfo(pycurl.NUM_CONNECTS),
        all_headers=lines,
    )
    if curl is None:
        c.close()
    return got


def raw_get(port: int, target: str) -> int:
    """Status for a request target sent verbatim (curl would normalise "/../")."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("www")
    (r / "small.bin").write_bytes(SMALL)
    (r / "a.png").write_bytes(PLACEHOLDER_PNG)
    (r / "list.csv").write_text("ImageID\n1\n")
    (r / "x.gz").write_bytes(gzip.compress(b"x"))
    (r / "x.tar.gz").write_bytes(gzip.compress(b"x"))
    (r / "sub").mkdir()
    (r / "sub" / "photo.jpg").write_bytes(photo_like_jpeg(3, 64, 48))
    (r / "inside-link.bin").symlink_to(r / "small.bin")
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("secret")
    (r / "escape.txt").symlink_to(outside)
    return r


@pytest.fixture(scope="module")
def srv(root: Path) -> Iterator[LoopbackServer]:
    with LoopbackServer(root) as s:
        yield s


def wait_for(predicate, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- static files -----------------------------------------------------------------------------


def test_static_get_and_head(srv: LoopbackServer, root: Path) -> None:
    g = fetch(srv.url("small.bin"))
    assert (g.status, g.err, g.body) == (200, 0, SMALL)
    assert g.headers["content-length"] == str(len(SMALL))
    assert g.headers["content-type"] == "application/octet-stream"
    assert g.headers["accept-ranges"] == "bytes"
    assert g.headers["etag"].startswith('"') and g.headers["last-modified"].endswith("GMT")
    h = fetch(srv.url("small.bin"), head=True)
    assert (h.status, h.body, h.headers["content-length"]) == (200, b"", str(len(SMALL)))
    assert fetch(srv.url("sub/photo.jpg")).body == (root / "sub" / "photo.jpg").read_bytes()
    assert fetch(srv.url("inside-link.bin")).body == SMALL  # symlinks inside the root are fine


@pytest.mark.parametrize(
    "name, ctype",
    [
        ("sub/photo.jpg", "image/jpeg"),
        ("a.png", "image/png"),
        ("list.csv", "text/csv"),
        ("x.gz", "application/gzip"),
        ("x.tar.gz", "application/gzip"),
        ("small.bin", "application/octet-stream"),
    ],
)
def test_content_type_by_extension(srv: LoopbackServer, name: str, ctype: str) -> None:
    assert fetch(srv.url(name), head=True).headers["content-type"].split(";")[0] == ctype


def test_paths_outside_the_root_are_404(srv: LoopbackServer) -> None:
    assert raw_get(srv.port, "/small.bin") == 200  # the control: raw requests work
    for target in ("/../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/sub/../../etc/passwd",
                   "/escape.txt", "/nope.jpg", "/sub", "/"):
        assert raw_get(srv.port, target) == 404, target


def test_ranges_all_three_forms_and_unsatisfiable(srv: LoopbackServer) -> None:
    n = len(SMALL)
    g = fetch(srv.url("small.bin"), headers=("Range: bytes=100-199",))
    assert (g.status, g.body, g.headers["content-range"]) == (206, SMALL[100:200], f"bytes 100-199/{n}")
    g = fetch(srv.url("small.bin"), headers=("Range: bytes=20000-",))
    assert (g.status, g.body, g.headers["content-range"]) == (206, SMALL[20000:], f"bytes 20000-{n - 1}/{n}")
    g = fetch(srv.url("small.bin"), headers=("Range: bytes=-300",))
    assert (g.status, g.body, g.headers["content-range"]) == (206, SMALL[-300:], f"bytes {n - 300}-{n - 1}/{n}")
    g = fetch(srv.url("small.bin"), headers=("Range: bytes=20000-99999999",))  # the end is clipped
    assert (g.status, g.body) == (206, SMALL[20000:])
    g = fetch(srv.url("small.bin"), headers=(f"Range: bytes={n}-",))
    assert (g.status, g.headers["content-range"]) == (416, f"bytes */{n}")
    g = fetch(srv.url("small.bin", norange=1), headers=("Range: bytes=100-199",))
    assert (g.status, g.body) == (200, SMALL)


def test_if_range(srv: LoopbackServer) -> None:
    etag = fetch(srv.url("small.bin"), head=True).headers["etag"]
    g = fetch(srv.url("small.bin"), headers=("Range: bytes=10-19", f"If-Range: {etag}"))
    assert (g.status, g.body) == (206, SMALL[10:20])
    g = fetch(srv.url("small.bin"), headers=("Range: bytes=10-19", 'If-Range: "stale-etag"'))
    assert (g.status, g.body) == (200, SMALL)


# -- behaviours -------------------------------------------------------------------------------


def test_status_and_fail_then_serve(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", status=404))
    assert g.status == 404 and g.headers["content-type"].startswith("text/html") and b"404" in g.body
    url = srv.url("small.bin", fail=2, fail_status=429, retry_after=3, k="t1")
    for _ in range(2):
        g = fetch(url)
        assert (g.status, g.headers.get("retry-after")) == (429, "3")
    assert (fetch(url).status, fetch(url).body) == (200, SMALL)
    other_row = srv.url("small.bin", fail=2, fail_status=429, retry_after=3, k="t2")
    assert fetch(other_row).status == 429  # counters are per request target
    default = srv.url("small.bin", fail=1, k="t3")
    g = fetch(default)
    assert g.status == 503 and "retry-after" not in g.headers
    assert fetch(default).status == 200
    srv.reset_stats()  # clears the stateful counters too
    assert fetch(default).status == 503


def test_cut_closes_after_n_bytes(srv: LoopbackServer) -> None:
    url = srv.url("small.bin", cut=1000, k="c1")
    g = fetch(url)
    assert g.err == pycurl.E_PARTIAL_FILE and len(g.body) == 1000
    assert g.headers["content-length"] == str(len(SMALL))  # promised the full length
    assert fetch(url).body == SMALL  # cut_times defaults to 1
    always = srv.url("small.bin", cut=500, cut_times=-1, k="c2")
    assert [len(fetch(always).body) for _ in range(3)] == [500, 500, 500]
    twice = srv.url("small.bin", cut=500, cut_times=2, k="c3")
    assert [fetch(twice).err for _ in range(3)] == [pycurl.E_PARTIAL_FILE, pycurl.E_PARTIAL_FILE, 0]
    # a resumed range request is cut too, then served
    g = fetch(srv.url("small.bin", cut=100, k="c4"), headers=("Range: bytes=1000-",))
    assert (g.status, len(g.body), g.err) == (206, 100, pycurl.E_PARTIAL_FILE)


def test_stall_sends_1k_then_nothing(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", stall=1), low_speed_s=1, timeout_s=5)
    assert g.err == pycurl.E_OPERATION_TIMEDOUT
    assert len(g.body) == 1024
    assert 0.8 < g.elapsed_s < 4.5, g.elapsed_s


def test_rate_throttles(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", rate=20480))  # 20 KiB at 20 KiB/s
    assert g.body == SMALL
    assert 0.6 < g.elapsed_s < 3.0, g.elapsed_s


def test_many_slow_connections_are_cheap(srv: LoopbackServer) -> None:
    """300 throttled transfers at once finish together, and the server burns little CPU doing it."""
    n, body_len = 300, 2048
    proc = psutil.Process(srv.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    multi = pycurl.CurlMulti()
    handles = []
    for i in range(n):
        c = pycurl.Curl()
        c.setopt(pycurl.URL, srv.url("small.bin", rate=2048, k=f"slow{i}"))
        c.setopt(pycurl.RANGE, f"0-{body_len - 1}")
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROXY, "")
        c.setopt(pycurl.TIMEOUT_MS, 15000)
        c.setopt(pycurl.WRITEFUNCTION, lambda d: None)
        multi.add_handle(c)
        handles.append(c)
    srv.reset_stats()
    t0 = time.monotonic()
    running = n
    while running:
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        running = multi.perform()[1]
        multi.select(0.1)
    elapsed = time.monotonic() - t0
    codes = [c.getinfo(pycurl.RESPONSE_CODE) for c in handles]
    sizes = [c.getinfo(pycurl.SIZE_DOWNLOAD_T) for c in handles]
    for c in handles:
        multi.remove_handle(c)
        c.close()
    multi.close()
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    assert codes == [206] * n and sizes == [body_len] * n
    assert 0.7 < elapsed < 8, elapsed  # ~1 s each, concurrently, not 300 s in sequence
    assert srv.stats()["max_concurrent_connections"] >= n // 2
    assert cpu < 3.0, f"server used {cpu:.2f} s CPU for {n} slow connections"


def test_delay_before_headers(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", delay=0.4))
    assert g.body == SMALL and g.elapsed_s >= 0.4


def test_sleep_close_answers_nothing(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", sleep_close=0.3))
    assert g.err == pycurl.E_GOT_NOTHING and g.elapsed_s >= 0.3


def test_redirect_chain_loop_and_locations(srv: LoopbackServer) -> None:
    srv.reset_stats()
    g = fetch(srv.url("small.bin", redirect=3, k="r"), follow=True)
    assert (g.status, g.redirects, g.body) == (200, 3, SMALL)
    assert g.effective_url == srv.url("small.bin", k="r")  # the chain ends at the target without redirect=
    assert len(srv.stats()["requests"]) == 4
    g = fetch(srv.url("small.bin", loop=1), follow=True, maxredirs=5)
    assert g.err == pycurl.E_TOO_MANY_REDIRECTS
    for location in ("file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "gopher://127.0.0.1/1"):
        g = fetch(srv.url("small.bin", location=location))
        assert (g.status, g.headers["location"]) == (302, location)


def test_dead_redirects_to_a_placeholder_on_another_host(srv: LoopbackServer) -> None:
    g = fetch(srv.url("sub/photo.jpg", dead=1))
    assert g.status == 302
    assert g.headers["location"] == f"http://localhost:{srv.port}/pw/images/en-us/photo_unavailable_l.png"
    g = fetch(srv.url("sub/photo.jpg", dead=1), follow=True)
    assert (g.status, g.headers["content-type"]) == (200, "image/png")
    img = pyvips.Image.new_from_buffer(g.body, "")
    assert (img.width, img.height, img.get("vips-loader")) == (500, 374, "pngload_buffer")
    assert img.avg() > 0  # decodes
    assert fetch(srv.url("pw/images/fr-fr/photo_unavailable.png")).body == PLACEHOLDER_PNG


def test_ctype_gzip_chunked(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", ctype="text/html"))
    assert (g.headers["content-type"], g.body) == ("text/html", SMALL)
    g = fetch(srv.url("small.bin", gzip=1))  # sent compressed though the client did not ask
    assert g.headers["content-encoding"] == "gzip"
    assert gzip.decompress(g.body) == SMALL and int(g.headers["content-length"]) == len(g.body)
    g = fetch(srv.url("small.bin", chunked=1))
    assert g.headers["transfer-encoding"] == "chunked" and "content-length" not in g.headers
    assert (g.err, g.body) == (0, SMALL)
    g = fetch(srv.url("small.bin", chunked=1, cut=5000, k="chunkcut"))
    assert g.err != 0 and len(g.body) < 5000  # a cut chunked body is an error, not a short success


@pytest.mark.parametrize(
    "kind, ctype, marker",
    [("html", "text/html", b"Not Found"), ("xml", "application/xml", b"NoSuchKey"), ("text", "text/plain", b"Not Found"),
     ("empty", "image/jpeg", b"")],
)
def test_body_replacements(srv: LoopbackServer, kind: str, ctype: str, marker: bytes) -> None:
    g = fetch(srv.url("sub/photo.jpg", body=kind))
    assert g.status == 200 and g.headers["content-type"].split(";")[0] == ctype
    assert marker in g.body and (kind != "empty" or g.body == b"")


def test_bad_requests_get_clear_errors(srv: LoopbackServer) -> None:
    g = fetch(srv.url("small.bin", fail="abc"))
    assert g.status == 400 and b"not an integer" in g.body
    g = fetch(srv.url("small.bin", body="pdf"))
    assert g.status == 400
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("POST", "/small.bin", body=b"x")
    resp = conn.getresponse()
    assert resp.status == 405
    conn.close()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


# -- keep-alive and statistics ----------------------------------------------------------------


def test_keep_alive_reuses_one_connection(srv: LoopbackServer) -> None:
    srv.reset_stats()
    c = pycurl.Curl()
    connects = [fetch(srv.url("small.bin", k=f"ka{i}"), curl=c).connects for i in range(5)]
    # an error page does not close the connection either
    connects.append(fetch(srv.url("small.bin", status=404), curl=c).connects)
    connects.append(fetch(srv.url("small.bin"), curl=c).connects)
    c.close()
    assert connects == [1, 0, 0, 0, 0, 0, 0]
    s = srv.stats()
    assert s["max_concurrent_connections"] == 1 and s["total_requests"] == 7
    assert s["bytes_sent"] >= 6 * len(SMALL)


def test_stats_count_requests_ranges_and_concurrency_per_host(srv: LoopbackServer) -> None:
    srv.reset_stats()
    fetch(srv.url("small.bin", k="s"), headers=("Range: bytes=5-",))
    fetch(srv.url("small.bin", k="s"))
    # a.test through a multi capped at 2 connections per host; b.test uncapped, fresh connections
    capped, free = pycurl.CurlMulti(), pycurl.CurlMulti()
    capped.setopt(pycurl.M_MAX_HOST_CONNECTIONS, 2)
    handles: list[tuple[pycurl.CurlMulti, pycurl.Curl]] = []
    for host, multi, count in (("a.test", capped, 4), ("b.test", free, 10)):
        for i in range(count):
            c = pycurl.Curl()
            c.setopt(pycurl.URL, f"http://{host}:{srv.port}/small.bin?delay=0.3&k={host}{i}")
            c.setopt(pycurl.RESOLVE, [f"{host}:{srv.port}:127.0.0.1"])
            c.setopt(pycurl.NOSIGNAL, 1)
            c.setopt(pycurl.PROXY, "")
            c.setopt(pycurl.TIMEOUT_MS, 10000)
            c.setopt(pycurl.WRITEFUNCTION, lambda d: None)
            multi.add_handle(c)
            handles.append((multi, c))
    deadline = time.monotonic() + 15
    running = True
    while running and time.monotonic() < deadline:
        running = False
        for m in (capped, free):
            while m.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            running |= m.perform()[1] > 0
            m.select(0.02)
    assert [c.getinfo(pycurl.RESPONSE_CODE) for _, c in handles] == [200] * 14
    for m, c in handles:
        m.remove_handle(c)
        c.close()
    capped.close()
    free.close()
    s = srv.stats()
    by_host = s["max_concurrent_by_host"]
    assert by_host[f"a.test:{srv.port}"] == 2, by_host  # capped
    assert by_host[f"b.test:{srv.port}"] >= 8, by_host  # uncapped: (about) all 10 at once
    assert s["max_concurrent_connections"] >= 10
    assert s["requests"][srv.url("small.bin", k="s")[len(srv.base_url):]] == 2
    assert s["ranges"]["/small.bin"] == ["bytes=5-"]
    assert s["total_requests"] == 2 + 4 + 10
    assert wait_for(lambda: srv.stats()["active_connections"] == 0)
    srv.reset_stats()
    s = srv.stats()
    assert (s["total_requests"], s["requests"], s["ranges"], s["bytes_sent"]) == (0, {}, {}, 0)


def test_several_hosts_share_one_port(root: Path) -> None:
    with LoopbackServer(root, hosts=("127.0.0.1", "127.0.0.2")) as s:
        for host in ("127.0.0.1", "127.0.0.2"):
            assert fetch(f"http://{host}:{s.port}/small.bin").body == SMALL
        assert s.base_url == f"http://127.0.0.1:{s.port}"


# -- lifecycle --------------------------------------------------------------------------------


def test_close_leaves_no_process(root: Path) -> None:
    s = LoopbackServer(root).start()
    pid = s.pid
    assert pid is not None and psutil.pid_exists(pid)
    proc = s._proc
    s.close()
    assert proc is not None and proc.returncode == 0  # SIGTERM is a clean exit
    assert not psutil.pid_exists(pid)
    s.close()  # idempotent


def test_server_exits_when_its_parent_dies(root: Path) -> None:
    """A parent killed without cleanup (os._exit skips finalizers) must not leave an orphan server."""
    code = (
        "import os, sys; from engine.loopback import LoopbackServer; "
        f"s = LoopbackServer({str(root)!r}).start(); print(s.pid, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=REPO)
    pid = int(out.stdout.split()[0])
    gone = wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    if not gone:
        os.kill(pid, signal.SIGKILL)
    assert gone, "the loopback server outlived its parent"


def test_command_line_prints_port_and_stops_on_sigint(root: Path) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "engine.loopback", "--root", str(root), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("PORT ")
        port = int(line.split()[1])
        assert raw_get(port, "/small.bin") == 200
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
        assert p.stdout.read() == ""  # type: ignore[union-attr]  # exactly one line
        assert p.stderr.read() == ""  # type: ignore[union-attr]  # nothing logged per request
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_bad_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LoopbackError, match="not a directory"):
        LoopbackServer(tmp_path / "missing").start()
    p = subprocess.run([sys.executable, "-m", "engine.loopback", "--root", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=20, cwd=REPO)
    assert p.returncode == 2 and "not a directory" in p.stderr and "Traceback" not in p.stderr


def test_url_builder(srv: LoopbackServer) -> None:
    assert srv.url("/images/a b.jpg", fail=2, norange=True) == f"{srv.base_url}/images/a%20b.jpg?fail=2&norange=1"
    assert srv.url("x.jpg") == f"{srv.base_url}/x.jpg"


# -- corpus -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusItem]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root, 14, seed=11, broken=3, large_fraction=0.08)


def test_corpus_manifest_matches_the_files(corpus: tuple[Path, list[CorpusItem]]) -> None:
    root, items = corpus
    assert len(items) == 14 and len({i.image_id for i in items}) == 14
    manifest = json.loads((root / "corpus.json").read_text())
    assert [CorpusItem(**d) for d in manifest["items"]] == items
    for it in items:
        assert len(it.image_id) == 16 and int(it.image_id, 16) >= 0 and it.image_id == it.image_id.lower()
        assert it.relpath == f"images/{it.image_id}.jpg"
        data = (root / it.relpath).read_bytes()
        assert len(data) == it.size
        assert base64.b64decode(it.md5_b64) == hashlib.md5(data).digest()
    assert sorted(i.broken for i in items if i.broken) == ["empty", "html", "truncated"]
    good = [i for i in items if not i.broken]
    assert len({i.md5_b64 for i in good}) == len(good)  # every file distinct
    large = [i for i in good if max(i.width, i.height) > 1024]
    assert len(large) == 1 and 2048 <= max(large[0].width, large[0].height) <= 4096
    shapes = {(i.width, i.height) for i in good if i not in large}
    assert shapes <= {(1024, 768), (768, 1024)}


def test_corpus_images_decode_and_broken_ones_do_not(corpus: tuple[Path, list[CorpusItem]]) -> None:
    root, items = corpus
    for it in items:
        data = (root / it.relpath).read_bytes()
        if it.broken is None:
            img = pyvips.Image.new_from_buffer(data, "", fail_on="truncated")
            assert (img.width, img.height, img.bands) == (it.width, it.height, 3)
            assert img.get("vips-loader") == "jpegload_buffer"
            if max(it.width, it.height) <= 1024:  # decode the small ones fully (keep the test cheap)
                assert img.deviate() > 10, "photo-like, not a flat colour"
                assert 80_000 < it.size < 400_000
        elif it.broken == "truncated":
            assert data[:2] == b"\xff\xd8"
            with pytest.raises(pyvips.Error):
                pyvips.Image.new_from_buffer(data, "", fail_on="truncated").avg()
        else:
            assert (it.broken == "empty") == (data == b"")
            assert (it.broken == "html") == data.lstrip().lower().startswith(b"<!doctype html")
            with pytest.raises(pyvips.Error):
                pyvips.Image.new_from_buffer(data, "")


def test_corpus_is_deterministic_and_seeded(tmp_path: Path, corpus: tuple[Path, list[CorpusItem]]) -> None:
    _, items = corpus
    again = make_corpus(tmp_path / "again", 14, seed=11, broken=3, large_fraction=0.08)
    assert again == items
    other = make_corpus(tmp_path / "other", 4, seed=12, large_fraction=0.0)
    assert not {i.md5_b64 for i in other} & {i.md5_b64 for i in items}
    assert not {i.image_id for i in other} & {i.image_id for i in items}
    assert photo_like_jpeg(5, 96, 64) == photo_like_jpeg(5, 96, 64) != photo_like_jpeg(6, 96, 64)


def test_corpus_cache_reuse_and_rebuild(tmp_path: Path) -> None:
    root = tmp_path / "c"
    first = make_corpus(root, 4, seed=1, large_fraction=0.0)
    mtimes = {i.relpath: (root / i.relpath).stat().st_mtime_ns for i in first}
    assert make_corpus(root, 4, seed=1, large_fraction=0.0) == first
    assert {i.relpath: (root / i.relpath).stat().st_mtime_ns for i in first} == mtimes  # not rewritten
    # a damaged file invalidates the cache
    (root / first[0].relpath).write_bytes(b"junk")
    assert make_corpus(root, 4, seed=1, large_fraction=0.0) == first
    assert (root / first[0].relpath).stat().st_size == first[0].size
    # other parameters rebuild, and files of the old corpus are removed
    second = make_corpus(root, 2, seed=2, large_fraction=0.0)
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(f"{i.image_id}.jpg" for i in second)
    # cache=False always regenerates (same bytes)
    assert make_corpus(root, 2, seed=2, large_fraction=0.0, cache=False) == second
    with pytest.raises(ValueError, match="broken"):
        make_corpus(root, 2, broken=3)


@pytest.mark.parametrize("gz, rotation", [(False, False), (True, True)])
def test_openimages_list(tmp_path: Path, corpus: tuple[Path, list[CorpusItem]], gz: bool, rotation: bool) -> None:
    _, items = corpus
    path = tmp_path / ("images.csv.gz" if gz else "images.csv")
    write_openimages_list(path, items, "http://127.0.0.1:9/", subset="validation", rotation=rotation, gzip=gz)
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if gz else raw).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = ["ImageID", "Subset", "OriginalURL", "OriginalLandingURL", "License", "AuthorProfileURL", "Author",
              "Title", "OriginalSize", "OriginalMD5", "Thumbnail300KURL"] + (["Rotation"] if rotation else [])
    assert rows[0] == header and len(rows) == len(items) + 1
    for row, it in zip(rows[1:], items):
        rec = dict(zip(header, row))
        assert rec["ImageID"] == it.image_id and rec["Subset"] == "validation"
        assert rec["OriginalURL"] == rec["Thumbnail300KURL"] == f"http://127.0.0.1:9/{it.relpath}"
        assert (rec["OriginalSize"], rec["OriginalMD5"]) == (str(it.size), it.md5_b64)
        assert rec.get("Rotation", "0.0") == "0.0"
    authors_titles = " ".join(r[6] + r[7] for r in rows[1:])
    assert "," in authors_titles and '"' in authors_titles and any(ord(ch) > 127 for ch in authors_titles)
    assert '""' in text  # quotes escaped the csv way (QUOTE_MINIMAL)


def test_served_corpus_matches_its_list(tmp_path: Path, corpus: tuple[Path, list[CorpusItem]]) -> None:
    root, items = corpus
    with LoopbackServer(root) as s:
        write_openimages_list(tmp_path / "l.csv", items, s.base_url)
        with (tmp_path / "l.csv").open(newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                body = fetch(rec["OriginalURL"]).body
                assert len(body) == int(rec["OriginalSize"])
                assert base64.b64encode(hashlib.md5(body).digest()).decode() == rec["OriginalMD5"]


def test_corpus_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "engine.corpus", "--out", str(out), "-n", "2", "--seed", "4",
                        "--base-url", "http://h:1"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    rows = list(csv.reader((out / "images.csv").open(newline="", encoding="utf-8")))
    assert len(rows) == 3 and rows[1][2].startswith("http://h:1/images/")
    p = subprocess.run([sys.executable, "-m", "engine.corpus", "--out", str(out), "-n", "2", "--broken", "3"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
