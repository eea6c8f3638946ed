"""Live web UI (``--ui web`` / ``--web-port``): one page, updated by Server-Sent Events.

Served by the standard library's ThreadingHTTPServer in the monitor process (no framework,
no CDN: the page and its small canvas charts are in ``engine/web_static/``). Endpoints:

- ``/`` the page; ``/events`` an SSE stream with the current view once a second;
- ``/api/view`` and ``/api/history`` the same data as JSON (rates of the last 15 minutes);
- ``/img/<ImageID>`` the smallest written variant of a *recently finished* image (the
  gallery). Only IDs on the board can be asked for, so no request can name a path, and the
  original download is never served.
- ``/boxes/<ImageID>`` (same IDs) that image's annotation boxes mapped into the gallery file,
  with class names, when the run has ``--annotations`` (:mod:`engine.overlay`).
"""

from __future__ import annotations

import json
import math
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from .monitor import SAMPLE_EVERY_S

STATIC = Path(__file__).with_name("web_static")
_IMAGE_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif",
                ".avif": "image/avif", ".heic": "image/heic", ".tif": "image/tiff"}


def _clean(obj: object) -> object:
    """JSON has no NaN/Infinity: turn them into null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json(obj: object) -> bytes:
    return json.dumps(_clean(obj), separators=(",", ":")).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    holder = None  # engine.monitor._Holder
    stopping: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # the terminal belongs to the TUI / the progress lines

    def _send(self, body: bytes, ctype: str, status: int = 200, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        data = self.server.holder.data
        if path in ("/", "/index.html"):
            self._send((STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
        elif path == "/api/view":
            self._send(_json(data.view() if data else {}), "application/json")
        elif path == "/api/history":
            self._send(_json(data.history_points() if data else []), "application/json")
        elif path == "/events":
            self._events()
        elif path.startswith("/boxes/"):
            ans = data.image_boxes(unquote(path[7:])) if data else None
            if ans is None:
                self._send(b"not a recent image\n", "text/plain", HTTPStatus.NOT_FOUND)
            else:
                self._send(_json(ans), "application/json")
        elif path.startswith("/img/"):
            p = data.image_path(unquote(path[5:])) if data else None
            if p is None:
                self._send(b"not a recent image\n", "text/plain", HTTPStatus.NOT_FOUND)
                return
            try:
                body = p.read_bytes()
            except OSError:
                self._send(b"gone\n", "text/plain", HTTPStatus.NOT_FOUND)
                return
            self._send(body, _IMAGE_TYPES.get(p.suffix.lower(), "application/octet-stream"), cache="max-age=3600")
        else:
            self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        last = None
        stopping = self.server.stopping
        try:
            while not stopping.is_set():
                data = self.server.holder.data
                view = data.view() if data else None
                if view and view.get("t") != last:
                    last = view.get("t")
                    self.wfile.write(b"data: " + _json(view) + b"\n\n")
                    self.wfile.flush()
                elif not view:
                    self.wfile.write(b": waiting for the run to start\n\n")
                    self.wfile.flush()
                stopping.wait(SAMPLE_EVERY_S / 4)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away


def serve_web(holder, host: str, port: int) -> tuple[Callable[[], None], str]:  # noqa: ANN001
    """Serve the UI on host:port (port 0: any free port); returns (close, URL)."""
    cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    httpd = cls((host, port), _Handler)
    httpd.holder = holder
    httpd.stopping = threading.Event()
    t = threading.Thread(target=httpd.serve_forever, name="web", daemon=True)
    t.start()

    def close() -> None:
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()

    shown = f"[{host}]" if ":" in host else host
    return close, f"http://{shown}:{httpd.server_address[1]}/"
