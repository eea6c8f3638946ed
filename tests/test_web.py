"""Issue 5: the web UI in a real headless Chromium, driven over the DevTools protocol.

The DevTools websocket is spoken with a minimal stdlib client (RFC 6455 text frames), so the
test needs only Debian's ``chromium``: no Selenium, no Playwright, no driver binary.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from conftest import kill_tree_on_failure
from engine.board import Board
from engine.monitor import LiveData, _Holder
from engine.stats import Stats
from engine.web import serve_web
from obs_run import start_run

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


class DevTools:
    """Just enough of a websocket client for Runtime.evaluate."""

    def __init__(self, ws_url: str) -> None:
        u = urlsplit(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "DevTools closed the connection during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buf = head.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "DevTools connection closed"
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)  # the server never masks
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                 if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            msg = json.loads(self._recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expr: str) -> object:
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def close(self) -> None:
        self.sock.close()


@contextmanager
def _page(url: str, tmp_path: Path, *flags: str) -> Iterator[DevTools]:
    """A headless Chromium showing ``url``: its DevTools connection once the page has loaded."""
    browser = subprocess.Popen([CHROMIUM, *FLAGS, *flags, f"--user-data-dir={tmp_path / 'chrome'}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert browser.stderr is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = browser.stderr.readline()
            if not line:
                break
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
        assert port, "chromium did not start its DevTools server"
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page" and t["url"].startswith(url))
        dt = DevTools(page["webSocketDebuggerUrl"])
        try:
            deadline = time.monotonic() + 30
            while dt.eval("document.readyState + ':' + !!document.getElementById('status')") != "complete:true":
                assert time.monotonic() < deadline, "the page never loaded"
                time.sleep(0.2)
            yield dt
        finally:
            dt.close()
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            kill_tree_on_failure(browser)


PAGE_STATE = """(() => {
  const t = (id) => document.getElementById(id).textContent;
  const imgs = [...document.querySelectorAll('#gallery img')];
  return {status: t('status'), done: t('done'), todo: t('todo'), pct: t('pct'), eta: t('eta'), ok: t('ok'),
          failed: t('failed'), ips: t('ips'), net: t('net'), disk: t('disk'), downloading: t('downloading'),
          resizing: t('resizing'), transfers: document.querySelectorAll('#transfers tr').length,
          failures: [...document.querySelectorAll('#recent-failed .reason')].map((e) => e.textContent),
          recentOk: document.querySelectorAll('#recent-ok tr').length,
          images: imgs.filter((i) => i.complete && i.naturalWidth > 0).map((i) => [i.alt, i.naturalWidth,
                                                                                   i.naturalHeight]),
          chartInk: (() => { const c = document.getElementById('chart-ips');
                             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                             let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()};
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
@pytest.mark.timeout(180)
def test_web_ui_live_in_chromium(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    run = start_run(tmp_path, items, server, ["--ui", "none", "--web-port", "0"], ["web"])
    try:
        url = run.urls["web"]
        assert url.startswith("http://127.0.0.1:")
        with _page(url, tmp_path) as dt:
            states = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                s = dt.eval(PAGE_STATE)
                states.append(s)
                if (s["status"] == "live" and len(s["images"]) >= 3 and s["failures"]
                        and len({x["done"] for x in states}) >= 3 and s["chartInk"] > 0):
                    break
                time.sleep(1.0)
            first, last = states[0], states[-1]
            assert last["status"] == "live", last
            assert len({x["done"] for x in states}) >= 3, "the numbers never moved"
            assert last["todo"] == str(len(items))
            assert last["pct"].endswith("%") and last["eta"]
            assert int(last["ok"].replace(",", "")) > 0
            assert last["ips"] and last["net"].endswith("/s") and last["disk"].endswith("/s")
            assert last["recentOk"] > 0
            assert set(last["failures"]) <= {"truncated", "not_an_image", "empty", "size_mismatch", "md5_mismatch"}
            # new images appeared, as small thumbnails (the smallest variant: 128 px), not originals
            assert len(last["images"]) > len(first["images"])
            assert all(max(w, h) <= 128 for _, w, h in last["images"]), last["images"]
            assert last["chartInk"] > 0, "the rate chart drew nothing"
            assert any(int(s["downloading"]) > 0 and s["transfers"] > 0 for s in states)
    finally:
        assert run.stop() in (0, 130)


def test_web_serves_only_recent_images(tmp_path: Path, corpus, server) -> None:
    _, items = corpus
    run = start_run(tmp_path, items, server, ["--ui", "none", "--web-port", "0"], ["web"], rate_bps=400_000)
    try:
        url = run.urls["web"]
        deadline = time.monotonic() + 60
        view: dict = {}
        while time.monotonic() < deadline:
            view = json.load(urllib.request.urlopen(url + "api/view", timeout=5))
            if view.get("recent_ok"):
                break
            time.sleep(0.5)
        name = view["recent_ok"][0]["name"]
        with urllib.request.urlopen(url + "img/" + name, timeout=5) as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"
        # boxes only with --annotations: a note, never an error
        noboxes = json.load(urllib.request.urlopen(url + "boxes/" + name, timeout=5))
        assert noboxes["boxes"] == [] and "--annotations" in noboxes["note"]
        for bad in ("img/..%2F..%2Fetc%2Fpasswd", "img/notanid", "img/" + "a" * 300, "nothing",
                    "boxes/..%2F..%2Fetc%2Fpasswd", "boxes/notanid"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + bad, timeout=5)
            assert e.value.code == 404
        page = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "EventSource" in page and "http://" not in page.replace(url, "")  # no CDN: nothing from outside
    finally:
        assert run.stop() in (0, 130)


#: how far each panel, and each scrolling list in it, overflows sideways (px), and whether the
#: long names are cut with an ellipsis inside their cell
OVERFLOW = """(() => {
  const out = {page: document.documentElement.scrollWidth - document.documentElement.clientWidth, panels: {}};
  for (const s of document.querySelectorAll('section')) {
    const boxes = [s, ...s.querySelectorAll('.scroll')];
    out.panels[s.querySelector('h2').textContent] = Math.max(...boxes.map((b) => b.scrollWidth - b.clientWidth));
  }
  const cut = (sel) => [...document.querySelectorAll(sel)].filter((td) => td.textContent.length > 40)
    .map((td) => ({fits: td.scrollWidth <= td.clientWidth, ellipsis: getComputedStyle(td).textOverflow === 'ellipsis',
                   title: td.title === td.textContent}));
  out.cut = {transfers: cut('#transfers td'), ok: cut('#recent-ok td'), failed: cut('#recent-failed td'),
             resizes: cut('#resizes td')};
  return out;
})()"""


def _fill_board(stats: Stats) -> None:
    """Rows as a run shows them, with the longest names the board carries and real-length ones."""
    board = Board.of(stats)
    now = time.monotonic()
    long_name = ("10245691204_98dce75b5a_o" * 3)[:60] + ".jpg"  # a transfer: the URL's last part, <= 64 bytes
    attempts = [SimpleNamespace(job=SimpleNamespace(seq=i, url=f"http://127.0.0.1/{long_name if i % 2 else f'{i:016x}_o.jpg'}"),
                                nbytes=123_456 * i, total=9_876_543, t_start=now - i) for i in range(1, 9)]
    fetcher = board.fetcher(0)  # one view: making another starts a fresh list, as a restarted fetcher does
    fetcher.publish(attempts, now)
    fetcher.handed_on(77, f"http://127.0.0.1/{long_name}")
    board.worker(1).start(77, 2_345_678, now)
    longest_id = "0123456789abcdef" * 8  # the longest ImageID the engine accepts: 128 characters
    rows = []
    for i in range(30):
        image_id = longest_id if i % 3 == 0 else f"{i:016x}"
        if i % 5 == 4:
            rows.append(SimpleNamespace(image_id=image_id, status="failed", reason="not_an_image", nbytes=0, width=0,
                                        height=0, outputs=(), detail="got text/html: <!DOCTYPE html><html><head>" * 4))
        else:
            rows.append(SimpleNamespace(image_id=image_id, status="ok", reason=None, detail=None, nbytes=1_234_567,
                                        width=6000, height=4000, outputs=()))
    board.writer().finished(rows, time.time())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
@pytest.mark.timeout(120)
def test_panels_fit_their_width(tmp_path: Path) -> None:
    """No panel scrolls sideways at 1400 px (nor at 1024 or 1920): long names end in an ellipsis."""
    stats = Stats.create(1, 2)
    holder = _Holder()
    close = None
    try:
        _fill_board(stats)
        holder.data = LiveData(stats, tmp_path)
        holder.data.sample()
        close, url = serve_web(holder, "127.0.0.1", 0)
        with _page(url, tmp_path, "--window-size=1400,1000") as dt:
            assert dt.eval("window.innerWidth") == 1400
            deadline = time.monotonic() + 20
            while dt.eval("document.querySelectorAll('#recent-ok tr').length") == 0:
                assert time.monotonic() < deadline, "the page never showed the rows"
                time.sleep(0.2)
            for width in (1400, 1024, 1920):
                dt.call("Emulation.setDeviceMetricsOverride", width=width, height=1000, deviceScaleFactor=1,
                        mobile=False)
                time.sleep(0.3)  # a layout pass
                got = dt.eval(OVERFLOW)
                assert got["page"] <= 0, (width, got)
                assert {k: v for k, v in got["panels"].items() if v > 0} == {}, (width, got)
                for panel, cells in got["cut"].items():
                    # a name too long for its cell ends in an ellipsis, the whole of it in the title
                    assert cells and all(c["fits"] or (c["ellipsis"] and c["title"]) for c in cells), (width, panel)
                    if width == 1400:
                        assert not all(c["fits"] for c in cells), (panel, "nothing long enough to test")
                if width == 1400:
                    shot = dt.call("Page.captureScreenshot", format="png")
                    (tmp_path / "web-1400.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        if close is not None:
            close()
        holder.data = None
        stats.close()


# -- issue 11: annotation boxes over the gallery ---------------------------------------------
BOXES_STATE = """(() => {
  const figs = [...document.querySelectorAll('#gallery .pic')];
  return {ctl: getComputedStyle(document.getElementById('boxes-ctl')).display,
          checked: document.getElementById('show-boxes').checked,
          note: document.getElementById('boxes-note').textContent,
          pics: figs.map((f) => { const img = f.querySelector('img'), r = img.getBoundingClientRect();
            return {id: f.dataset.id, loaded: img.complete && img.naturalWidth > 0,
                    img: [r.left, r.top, r.width, r.height],
                    svg: getComputedStyle(f.querySelector('svg')).display,
                    boxes: [...f.querySelectorAll('g.box')].map((g) => {
                      const b = g.querySelector('rect').getBoundingClientRect();
                      return {name: g.dataset.name, label: g.querySelector('text').textContent,
                              rect: [b.left, b.top, b.width, b.height]}; })}; })};
})()"""


def _expected_boxes(db: Path, image_id: str, rotation: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(display name, normalised box in the stored, unrotated image) of every box of the DB."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT c.name, x_min, y_min, x_max, y_max FROM boxes b JOIN classes c ON c.mid = b.mid"
                            " WHERE image_id = ?", (image_id,)).fetchall()
    out = []
    for name, x0, y0, x1, y1 in rows:
        # README "Annotations": a normalised point of the upright image in the stored one
        turn = {0: lambda x, y: (x, y), 90: lambda x, y: (y, 1 - x), 180: lambda x, y: (1 - x, 1 - y),
                270: lambda x, y: (1 - y, x)}[rotation]
        (ax, ay), (bx, by) = turn(x0, y0), turn(x1, y1)
        out.append((name, (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))))
    return sorted(out)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
@pytest.mark.timeout(120)
def test_gallery_draws_annotation_boxes(tmp_path: Path, corpus, server) -> None:
    """--annotations: each gallery image carries its DB boxes, named and placed, and a remembered toggle."""
    from annotations_db import make_db

    _, items = corpus
    good = [i for i in items if not i.broken]
    db = make_db(tmp_path / "meta", [i.image_id for i in good])
    # no --apply-rotation: the boxes must be turned into the stored image's frame
    rotations = {i.image_id: (0, 90, 180, 270)[n % 4] for n, i in enumerate(good)}
    run = start_run(tmp_path, good, server, ["--ui", "none", "--web-port", "0", "--annotations", str(db)], ["web"],
                    rate_bps=300_000, rotations=rotations)
    try:
        url = run.urls["web"]
        with _page(url, tmp_path, "--window-size=1400,2000") as dt:
            t0 = time.monotonic()
            deadline = time.monotonic() + 60
            while True:
                s = dt.eval(BOXES_STATE)
                drawn = [p for p in s["pics"] if p["loaded"] and p["boxes"]]
                if len(drawn) >= 4:
                    break
                assert time.monotonic() < deadline, s
                time.sleep(0.5)
            print(f"boxes drawn on {len(drawn)} images after {time.monotonic() - t0:.1f} s")
            assert s["ctl"] != "none" and s["checked"]
            checked = 0
            for p in s["pics"]:
                if not p["loaded"]:
                    continue
                want = _expected_boxes(db, p["id"], rotations[p["id"]])
                got = sorted((b["name"], b["rect"]) for b in p["boxes"])
                if not p["boxes"] and want:
                    continue  # its /boxes answer is still on the way
                assert [n for n, _ in got] == [n for n, _ in want], p
                assert all(b["label"].startswith(b["name"]) for b in p["boxes"])
                ix, iy, iw, ih = p["img"]
                assert ih == pytest.approx(128, abs=0.5)  # the annotated gallery's row height
                # several boxes may share a class: match each drawn box to the nearest expected one
                for name, (x, y, w, h) in got:
                    err = min(max(abs(x - (ix + e[0] * iw)), abs(y - (iy + e[1] * ih)),
                                  abs(x + w - (ix + e[2] * iw)), abs(y + h - (iy + e[3] * ih)))
                              for n, e in want if n == name)
                    assert err <= 1.5, (p["id"], name, err)
                checked += 1
            assert checked >= 4
            images_without = [p for p in s["pics"] if p["loaded"] and not _expected_boxes(db, p["id"], 0)]
            assert all(not p["boxes"] for p in images_without)
            shot = base64.b64decode(dt.call("Page.captureScreenshot", format="png")["data"])
            (tmp_path / "gallery-boxes.png").write_bytes(shot)
            if os.environ.get("OIDL_SCREENSHOT_DIR"):  # for a human to look at
                (Path(os.environ["OIDL_SCREENSHOT_DIR"]) / "gallery-boxes.png").write_bytes(shot)
            # the toggle hides every overlay, and the choice survives a reload
            dt.eval("document.getElementById('show-boxes').click()")
            s = dt.eval(BOXES_STATE)
            assert not s["checked"] and s["pics"] and all(p["svg"] == "none" for p in s["pics"])
            assert all(b["rect"][2] == 0 for p in s["pics"] for b in p["boxes"])
            assert run.proc.poll() is None, "the run ended before the reload: slow it down (rate_bps)"
            dt.eval("location.reload()")
            deadline = time.monotonic() + 20
            while True:
                time.sleep(0.5)
                try:
                    s = dt.eval(f"document.readyState == 'complete' ? {BOXES_STATE} : null")
                except AssertionError:
                    s = None  # evaluated while the old page was going away
                if s and s["pics"]:
                    break
                assert time.monotonic() < deadline, "the gallery did not come back after a reload"
            assert not s["checked"] and all(p["svg"] == "none" for p in s["pics"])
            dt.eval("document.getElementById('show-boxes').click()")
            assert dt.eval(BOXES_STATE)["checked"]
    finally:
        assert run.stop() in (0, 130)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
@pytest.mark.timeout(60)
def test_gallery_says_why_boxes_are_missing(tmp_path: Path) -> None:
    """An image whose annotations file is gone is still shown; a note says why it has no boxes."""
    import pyvips

    from engine.overlay import BoxLookup

    out = tmp_path / "out"
    rows = []
    for n, image_id in enumerate(("00000000000000a1", "00000000000000a2")):
        rel = f"128/000/{image_id}.jpg"
        (out / "128/000").mkdir(parents=True, exist_ok=True)
        (pyvips.Image.black(128, 96) + 90).cast("uchar").jpegsave(str(out / rel))
        if n == 0:
            (out / rel).with_suffix(".json").write_text(json.dumps({
                "variant": "128", "width": 128, "height": 96, "source_width": 1024, "source_height": 768,
                "rotation": 0, "rotation_applied": False,
                "annotations": {"boxes": [{"mid": "/m/01yrx", "name": "Cat", "x_min": 0.5, "x_max": 1.0,
                                           "y_min": 0.0, "y_max": 0.5, "is_group_of": 0}]}}))
        rows.append(SimpleNamespace(image_id=image_id, status="ok", reason=None, detail=None, nbytes=5_000, width=1024,
                                    height=768, outputs=(SimpleNamespace(variant="128", path=rel, nbytes=900),)))
    stats = Stats.create(1, 1)
    holder = _Holder()
    close = None
    try:
        Board.of(stats).writer().finished(rows, time.time())
        holder.data = LiveData(stats, out, BoxLookup(out, {"128": "shrink"}))
        holder.data.sample()
        close, url = serve_web(holder, "127.0.0.1", 0)
        with _page(url, tmp_path) as dt:
            deadline = time.monotonic() + 20
            while True:
                s = dt.eval(BOXES_STATE)
                if sum(p["loaded"] for p in s["pics"]) == 2 and s["note"] and any(p["boxes"] for p in s["pics"]):
                    break
                assert time.monotonic() < deadline, s
                time.sleep(0.2)
            by_id = {p["id"]: p for p in s["pics"]}
            assert [b["name"] for b in by_id["00000000000000a1"]["boxes"]] == ["Cat"]
            x, y, w, h = by_id["00000000000000a1"]["boxes"][0]["rect"]
            ix, iy, iw, ih = by_id["00000000000000a1"]["img"]
            assert (x - ix, y - iy, w, h) == pytest.approx((iw / 2, 0, iw / 2, ih / 2), abs=1.0)
            assert by_id["00000000000000a2"]["boxes"] == []
            assert "no annotations file beside this image" in s["note"]
    finally:
        if close is not None:
            close()
        holder.data = None
        stats.close()
