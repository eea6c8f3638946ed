"""A misbehaving-on-demand HTTP/1.1 file server on loopback, for the demo, the tests and the benchmarks.

It serves the files under ``--root`` like a plain static server (ranges, If-Range, ETag, keep-alive),
and a request asks for the ways real image hosts misbehave through query parameters (combinable;
stateful ones count per full request target, so ``&k=<row id>`` gives each row its own state):

``status=N``               answer N with a small HTML page
``fail=N``                 the first N requests answer ``fail_status`` (503), with ``Retry-After: retry_after``
``cut=N``                  full Content-Length, then N body bytes and close (first ``cut_times`` requests; -1 = always)
``norange=1``              ignore Range              ``stall=1``  1 KiB of body, then silence until the client leaves
``rate=BPS``               throttle the body         ``delay=S``  wait before the headers
``redirect=N``             N 302s, then the target   ``loop=1``   302 to itself forever
``location=URL``           302 to exactly URL        ``dead=1``   302 to Flickr's "photo unavailable" PNG on localhost
``ctype=T``                override Content-Type     ``gzip=1``   Content-Encoding gzip   ``chunked=1``  chunked
``body=html|xml|text|empty``  200 with that instead of the file
``sleep_close=S``          read the request, close after S seconds without an answer

``GET /__stats`` returns counters as JSON and ``GET /__reset`` clears them. It is written on asyncio streams
so that thousands of concurrent, mostly idle or slow connections cost one coroutine each, never a thread.

Run it as ``python -m engine.loopback --root DIR [--host H ...] [--port 0]``: it prints one line
``PORT <n>`` once it listens and runs until SIGTERM/SIGINT. :class:`LoopbackServer` does that in a
subprocess, so that the server's event loop never competes with the code under test for the GIL.

Standard library only: the package ships it (``oidl-engine demo`` uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http
import http.client
import json
import os
import re
import resource
import selectors
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import IO, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

# -- protocol limits ----------------------------------------------------------------------
_MAX_HEADER_BYTES = 64 * 1024  # a request head larger than this gets 431
_MAX_REQUEST_BODY_BYTES = 1024 * 1024  # GET/HEAD bodies are read and dropped; more is abuse
_CHUNK_BYTES = 16 * 1024  # chunk size for chunked=1 framing
_STALL_BYTES = 1024  # stall=1 sends this much of the body, then nothing
_RATE_TICK_S = 0.25  # rate=BPS: one write per tick per connection keeps 1,000+ slow connections cheap
_FILE_CACHE_MAX_BYTES = 256 * 1024 * 1024  # static bodies kept in memory (benchmarks re-serve a corpus)
_FILE_CACHE_MAX_FILE_BYTES = 32 * 1024 * 1024
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0

_CONTENT_TYPES: dict[str, str] = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".csv": "text/csv; charset=utf-8",
    ".tar.gz": "application/gzip",
    ".tgz": "application/gzip",
    ".gz": "application/gzip",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}

# Flickr answers a deleted photo with a 302 to a placeholder on another host; this is that URL's shape.
_PLACEHOLDER_PATH_RE = re.compile(r"^/pw/images/[^/]+/photo_unavailable[^/]*\.png$")
_PLACEHOLDER_TARGET = "/pw/images/en-us/photo_unavailable_l.png"
_ADMIN_PATHS = frozenset({"/__stats", "/__reset"})

_SYNTHETIC_BODIES: dict[str, tuple[bytes, str]] = {
    # A "soft 404": status 200 with an HTML page, as some CDNs answer a missing image.
    "html": (
        b"<!DOCTYPE html>\n<html><head><title>Not Found</title></head>"
        b"<body><h1>Not Found</h1><p>The requested photo could not be found.</p></body></html>\n",
        "text/html; charset=utf-8",
    ),
    # What an S3/GCS bucket says for a missing key.
    "xml": (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchKey</Code>"
        b"<Message>The specified key does not exist.</Message></Error>",
        "application/xml",
    ),
    "text": (b"Not Found\n", "text/plain; charset=utf-8"),
}


def _placeholder_png() -> bytes:
    """A small valid grey 500x374 PNG, the size of Flickr's "photo unavailable" image."""
    width, height = 500, 374

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xd4" * width  # filter byte 0, then one grey byte per pixel
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


PLACEHOLDER_PNG: bytes = _placeholder_png()


def content_type_for(path: str) -> str:
    """Content-Type by file name; the longest matching suffix wins (``.tar.gz`` before ``.gz``)."""
    name = path.lower()
    for suffix in sorted(_CONTENT_TYPES, key=len, reverse=True):
        if name.endswith(suffix):
            return _CONTENT_TYPES[suffix]
    return "application/octet-stream"


def _html_page(status: int) -> bytes:
    phrase = _phrase(status)
    return (
        f"<html><head><title>{status} {phrase}</title></head>"
        f"<body><h1>{status} {phrase}</h1></body></html>\n"
    ).encode()


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"


class BadRequest(Exception):
    """The request (or one of its behaviour parameters) is malformed: answered with 400."""


# -- behaviour parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """The misbehaviour a request asks for through its query string (all optional, combinable)."""

    status: int | None = None
    fail: int = 0
    fail_status: int = 503
    retry_after_s: int | None = None
    cut_bytes: int | None = None
    cut_times: int = 1
    norange: bool = False
    stall: bool = False
    rate_bps: float | None = None
    delay_s: float = 0.0
    redirect: int = 0
    loop: bool = False
    location: str | None = None
    dead: bool = False
    ctype: str | None = None
    gzip: bool = False
    chunked: bool = False
    body: str | None = None
    sleep_close_s: float | None = None

    @classmethod
    def parse(cls, params: dict[str, str]) -> "Behaviour":
        def integer(name: str, lo: int, hi: int) -> int | None:
            raw = params.get(name)
            if raw is None:
                return None
            try:
                value = int(raw)
            except ValueError:
                raise BadRequest(f"{name}={raw!r}: not an integer") from None
            if not lo <= value <= hi:
                raise BadRequest(f"{name}={value}: must be within [{lo}, {hi}]")
            return value

        def number(name: str, lo: float, hi: float) -> float | None:
            raw = params.get(name)
            if raw is None:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise BadRequest(f"{name}={raw!r}: not a number") from None
            if not lo <= value <= hi:  # also rejects nan
                raise BadRequest(f"{name}={value}: must be within [{lo}, {hi}]")
            return value

        def flag(name: str) -> bool:
            return params.get(name, "0") not in ("0", "", "false")

        body = params.get("body")
        if body is not None and body not in (*_SYNTHETIC_BODIES, "empty"):
            raise BadRequest(f"body={body!r}: must be one of html, xml, text, empty")
        rate = number("rate", 0.0, 1e12)
        if rate is not None and rate <= 0:
            raise BadRequest("rate must be > 0 bytes/second")
        return cls(
            status=integer("status", 100, 999),
            fail=integer("fail", 0, 1_000_000) or 0,
            fail_status=integer("fail_status", 100, 999) or 503,
            retry_after_s=integer("retry_after", 0, 86_400),
            cut_bytes=integer("cut", 0, 1 << 40),
            cut_times=1 if (cut_times := integer("cut_times", -1, 1_000_000)) is None else cut_times,
            norange=flag("norange"),
            stall=flag("stall"),
            rate_bps=rate,
            delay_s=number("delay", 0.0, 3600.0) or 0.0,
            redirect=integer("redirect", 0, 1000) or 0,
            loop=flag("loop"),
            location=params.get("location"),
            dead=flag("dead"),
            ctype=params.get("ctype"),
            gzip=flag("gzip"),
            chunked=flag("chunked"),
            body=body,
            sleep_close_s=number("sleep_close", 0.0, 3600.0),
        )


# -- request parsing --------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str  # as received: path + query, the key of the stateful counters
    path: str  # percent-decoded path, starts with "/"
    query: str
    params: dict[str, str]
    version: str
    headers: dict[str, str]  # lower-case names

    @property
    def host(self) -> str:
        return self.headers.get("host", "")

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection, or None at a clean EOF between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("connection closed in the middle of a request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    while lines and not lines[0]:  # tolerate stray CRLFs between pipelined requests
        lines.pop(0)
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {lines[0][:100]!r}" if lines else "empty request")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line[:100]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest("request bodies with Transfer-Encoding are not supported")
    body_len = headers.get("content-length", "0")
    if not body_len.isdigit() or int(body_len) > _MAX_REQUEST_BODY_BYTES:
        raise BadRequest(f"unacceptable Content-Length {body_len!r}")
    if int(body_len):
        await reader.readexactly(int(body_len))  # GET/HEAD bodies mean nothing here: drop them
    split = urlsplit(target)  # also accepts the absolute form "http://host/path?q"
    path = unquote(split.path or "/")
    return Request(
        method=method,
        target=target,
        path=path,
        query=split.query,
        params=dict(parse_qsl(split.query, keep_blank_values=True)),
        version=version,
        headers=headers,
    )


# -- range requests ---------------------------------------------------------------------------

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(value: str, size: int) -> tuple[int, int] | None | str:
    """(first, last) inclusive for one satisfiable byte range; "unsatisfiable"; or None to ignore it.

    Multiple ranges and malformed values are ignored (a 200 with the whole body is a valid answer).
    """
    m = _RANGE_RE.match(value.replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first_s, last_s = m.groups()
    if not first_s:  # bytes=-n: the last n bytes
        n = int(last_s)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


# -- static files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    body: bytes
    size: int
    etag: str
    last_modified: str


class _FileStore:
    """Files under the root, with traversal checks and a bounded in-memory body cache."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self._cache: dict[str, tuple[int, int, _File]] = {}  # real path -> (size, mtime_ns, file)
        self._cached_bytes = 0

    def resolve(self, url_path: str) -> str | None:
        """The real path for a URL path, or None when it is not a path inside the root."""
        rel = url_path[1:] if url_path.startswith("/") else url_path
        if not rel or "\x00" in rel or rel.startswith("/") or "\\" in rel:
            return None  # "//etc/passwd" decodes to an absolute path: refuse
        if ".." in rel.split("/"):
            return None
        real = os.path.realpath(os.path.join(self.root, rel))
        if not real.startswith(self.root + os.sep):
            return None  # a symlink pointing out of the root
        return real

    def get(self, url_path: str) -> _File | None:
        real = self.resolve(url_path)
        if real is None:
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        hit = self._cache.pop(real, None)
        if hit is not None:
            self._cached_bytes -= hit[0]
            if hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                self._cache[real] = hit
                self._cached_bytes += hit[0]
                return hit[2]
        try:
            with open(real, "rb") as fh:
                body = fh.read()
        except OSError:
            return None
        f = _File(
            body=body,
            size=len(body),
            etag=f'"{st.st_size:x}-{st.st_mtime_ns:x}"',
            last_modified=formatdate(st.st_mtime, usegmt=True),
        )
        if len(body) <= _FILE_CACHE_MAX_FILE_BYTES:
            while self._cache and self._cached_bytes + len(body) > _FILE_CACHE_MAX_BYTES:
                _, (old_size, _, _) = self._cache.popitem()  # any victim will do for a test server
                self._cached_bytes -= old_size
            self._cache[real] = (len(body), st.st_mtime_ns, f)
            self._cached_bytes += len(body)
        return f


# -- statistics -------------------------------------------------------------------------------


@dataclass
class _Stats:
    total_requests: int = 0
    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ranges: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bytes_sent: int = 0
    active: int = 0
    max_active: int = 0
    active_by_host: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_by_host: dict[str, int] = field(default_factory=dict)

    def open_connection(self, host: str) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.active_by_host[host] += 1
        self.max_by_host[host] = max(self.max_by_host.get(host, 0), self.active_by_host[host])

    def close_connection(self, host: str) -> None:
        self.active -= 1
        self.active_by_host[host] -= 1
        if not self.active_by_host[host]:
            del self.active_by_host[host]

    def reset(self) -> None:
        self.total_requests = 0
        self.requests.clear()
        self.ranges.clear()
        self.bytes_sent = 0
        # Connections still open stay counted; the maxima restart from what is open now.
        self.max_active = self.active
        self.max_by_host = {h: n for h, n in self.active_by_host.items()}

    def as_json(self) -> dict[str, object]:
        return {
            "total_requests": self.total_requests,
            "requests": dict(self.requests),
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "active_connections": self.active,
            "max_concurrent_connections": self.max_active,
            "max_concurrent_by_host": dict(self.max_by_host),
            "bytes_sent": self.bytes_sent,
        }


# -- the server -------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


class _Handler:
    def __init__(self, root: Path, verbose: bool) -> None:
        self.files = _FileStore(root)
        self.verbose = verbose
        self.stats = _Stats()
        self.port = 0  # set once bound; dead=1 redirects need it
        # Stateful counters, keyed by the full request target, cleared by /__reset.
        self._fail_seen: dict[str, int] = defaultdict(int)
        self._cut_seen: dict[str, int] = defaultdict(int)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted_host: str | None = None
        first = True
        try:
            while True:
                try:
                    req = await _read_request(reader)
                except BadRequest as exc:
                    await self._write(writer, self._error(400, str(exc)), keep_alive=False, head_only=False)
                    return
                if req is None:
                    return
                # A connection is counted by the Host of its first request; connections that only
                # ask for /__stats or /__reset are not, so polling stats does not disturb them.
                if first and req.path not in _ADMIN_PATHS:
                    counted_host = req.host
                    self.stats.open_connection(counted_host)
                first = False
                if not await self.serve(req, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away: nothing to answer
        except Exception:  # a bug here must not pass for a misbehaviour the test asked for: say so
            traceback.print_exc()
            if not writer.is_closing():
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        finally:
            if counted_host is not None:
                self.stats.close_connection(counted_host)
            writer.close()

    async def serve(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must be closed afterwards.

        Order: admin endpoints, delay, sleep_close, fail, status, redirects (loop, location, dead,
        redirect), placeholder, body=, static file; then gzip/ctype/chunked shape the body and
        cut/stall/rate shape its delivery.
        """
        if req.path == "/__stats":
            return await self._write(writer, self._json(self.stats.as_json()), req.keep_alive, False, count=False)
        if req.path == "/__reset":
            self.stats.reset()
            self._fail_seen.clear()
            self._cut_seen.clear()
            return await self._write(writer, self._json({"ok": True}), req.keep_alive, False, count=False)

        self.stats.total_requests += 1
        self.stats.requests[req.target] += 1
        if "range" in req.headers:
            self.stats.ranges[req.path].append(req.headers["range"])
        if self.verbose:
            print(f"{req.method} {req.target} Host={req.host} Range={req.headers.get('range')}", file=sys.stderr)

        if req.method not in ("GET", "HEAD"):
            resp = self._error(405, f"method {req.method} not allowed")
            resp.headers.append(("Allow", "GET, HEAD"))
            return await self._write(writer, resp, req.keep_alive, False)
        try:
            b = Behaviour.parse(req.params)
        except BadRequest as exc:
            return await self._write(writer, self._error(400, str(exc)), req.keep_alive, False)
        head_only = req.method == "HEAD"

        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.sleep_close_s is not None:
            await asyncio.sleep(b.sleep_close_s)
            return False
        if b.fail:
            self._fail_seen[req.target] += 1
            if self._fail_seen[req.target] <= b.fail:
                return await self._write(writer, self._status_page(b.fail_status, b), req.keep_alive, head_only)
        if b.status is not None:
            return await self._write(writer, self._status_page(b.status, b), req.keep_alive, head_only)
        location = self._redirect_location(req, b)
        if location is not None:
            resp = _Response(302, [("Location", location), ("Content-Type", "text/html")], _html_page(302))
            return await self._write(writer, resp, req.keep_alive, head_only)

        resp = self._content(req, b)
        if resp.status not in (200, 206):
            return await self._write(writer, resp, req.keep_alive, head_only)
        self._shape_body(resp, b)
        return await self._deliver(req, reader, writer, resp, b, head_only)

    def _redirect_location(self, req: Request, b: Behaviour) -> str | None:
        if b.loop:
            return self._absolute(req, req.target)
        if b.location is not None:
            return b.location
        if b.dead:
            return f"http://localhost:{self.port}{_PLACEHOLDER_TARGET}"
        if b.redirect > 0:
            params = [(k, v) for k, v in parse_qsl(req.query, keep_blank_values=True) if k != "redirect"]
            if b.redirect > 1:
                params.append(("redirect", str(b.redirect - 1)))
            path = urlsplit(req.target).path or "/"
            return self._absolute(req, path + ("?" + urlencode(params) if params else ""))
        return None

    @staticmethod
    def _absolute(req: Request, target: str) -> str:
        # Absolute, on the Host the client used, so RESOLVE-mapped host names survive the redirect.
        return f"http://{req.host}{target}" if req.host else target

    def _content(self, req: Request, b: Behaviour) -> _Response:
        """The representation to send (status 200/206, or 404/416 pages)."""
        if _PLACEHOLDER_PATH_RE.match(req.path):
            return _Response(200, [("Content-Type", "image/png")], PLACEHOLDER_PNG)
        if b.body is not None:
            if b.body == "empty":
                return _Response(200, [("Content-Type", content_type_for(req.path))], b"")
            body, ctype = _SYNTHETIC_BODIES[b.body]
            return _Response(200, [("Content-Type", ctype)], body)
        f = self.files.get(req.path)
        if f is None:
            return self._error(404, f"{req.path} not found")
        headers = [
            ("Content-Type", content_type_for(req.path)),
            ("ETag", f.etag),
            ("Last-Modified", f.last_modified),
            ("Accept-Ranges", "bytes"),
        ]
        range_value = req.headers.get("range")
        if range_value is None or b.norange or b.gzip or b.chunked:
            return _Response(200, headers, f.body)  # ranges of a re-encoded body are not offered
        if_range = req.headers.get("if-range")
        if if_range is not None and if_range not in (f.etag, f.last_modified):
            return _Response(200, headers, f.body)  # the client's partial copy is stale
        rng = _parse_range(range_value, f.size)
        if rng is None:
            return _Response(200, headers, f.body)
        if rng == "unsatisfiable":
            resp = self._error(416, f"range {range_value!r} not satisfiable for {f.size} bytes")
            resp.headers.append(("Content-Range", f"bytes */{f.size}"))
            return resp
        first, last = rng  # type: ignore[misc]
        headers.append(("Content-Range", f"bytes {first}-{last}/{f.size}"))
        return _Response(206, headers, f.body[first : last + 1])

    @staticmethod
    def _shape_body(resp: _Response, b: Behaviour) -> None:
        if b.gzip:
            resp.body = gzip.compress(resp.body, compresslevel=1, mtime=0)
            resp.headers.append(("Content-Encoding", "gzip"))
        if b.ctype is not None:
            resp.headers = [(k, v) for k, v in resp.headers if k != "Content-Type"]
            resp.headers.append(("Content-Type", b.ctype))

    async def _deliver(
        self,
        req: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        resp: _Response,
        b: Behaviour,
        head_only: bool,
    ) -> bool:
        if b.chunked:
            payload = _chunked(resp.body)
            resp.headers.append(("Transfer-Encoding", "chunked"))
        else:
            payload = resp.body
            resp.headers.append(("Content-Length", str(len(payload))))
        limit = len(payload)
        close_after = False
        if b.cut_bytes is not None:
            self._cut_seen[req.target] += 1
            if b.cut_times < 0 or self._cut_seen[req.target] <= b.cut_times:
                limit = min(limit, b.cut_bytes)
                close_after = True
        if b.stall:
            limit = min(limit, _STALL_BYTES)
        # The headers look like a normal answer's: a real reset or stall is not announced.
        writer.write(self._head(resp, req.keep_alive))
        if head_only:
            await writer.drain()
            return req.keep_alive
        await self._send(writer, memoryview(payload)[:limit], b.rate_bps)
        await writer.drain()
        if b.stall:
            while await reader.read(65536):  # hold the connection until the client gives up
                pass
            return False
        return req.keep_alive and not close_after

    async def _send(self, writer: asyncio.StreamWriter, payload: memoryview, rate_bps: float | None) -> None:
        if rate_bps is None:
            writer.write(payload)
            self.stats.bytes_sent += len(payload)
            return
        # One absolute schedule per connection: each tick sends what the rate allows so far, so
        # timer jitter does not accumulate and a connection costs one wake-up per tick.
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        per_tick = max(1, int(rate_bps * _RATE_TICK_S))
        while sent < len(payload):
            n = min(per_tick, len(payload) - sent)
            writer.write(payload[sent : sent + n])
            sent += n
            self.stats.bytes_sent += n
            await writer.drain()
            if sent < len(payload):
                await asyncio.sleep(max(0.0, start + sent / rate_bps - loop.time()))

    async def _write(
        self, writer: asyncio.StreamWriter, resp: _Response, keep_alive: bool, head_only: bool, count: bool = True
    ) -> bool:
        """Send a whole response; ``count=False`` keeps admin answers out of ``bytes_sent``."""
        resp.headers.append(("Content-Length", str(len(resp.body))))
        writer.write(self._head(resp, keep_alive))
        if not head_only and resp.body:
            writer.write(resp.body)
            if count:
                self.stats.bytes_sent += len(resp.body)
        await writer.drain()
        return keep_alive

    @staticmethod
    def _head(resp: _Response, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {resp.status} {_phrase(resp.status)}", "Server: oidl-loopback"]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    def _error(status: int, detail: str) -> _Response:
        body = _html_page(status).replace(b"</body>", f"<p>{detail}</p></body>".encode("utf-8", "replace"))
        return _Response(status, [("Content-Type", "text/html; charset=utf-8")], body)

    @staticmethod
    def _status_page(status: int, b: Behaviour) -> _Response:
        resp = _Response(status, [("Content-Type", "text/html")], _html_page(status))
        if b.retry_after_s is not None:
            resp.headers.append(("Retry-After", str(b.retry_after_s)))
        return resp

    @staticmethod
    def _json(obj: object) -> _Response:
        return _Response(200, [("Content-Type", "application/json")], json.dumps(obj).encode())


def _chunked(body: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(body), _CHUNK_BYTES):
        piece = body[i : i + _CHUNK_BYTES]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    out += b"0\r\n\r\n"
    return bytes(out)


def _raise_fd_limit() -> None:
    # Thousands of concurrent connections need thousands of descriptors; the soft limit is often 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit: fine for anything but the largest benchmarks


async def _bind(handler: _Handler, hosts: Sequence[str], port: int) -> tuple[list[asyncio.Server], int]:
    """Listen on every host on one port: the first host picks it (port 0 = ephemeral), the rest follow.

    An ephemeral port that happens to be taken on another address is retried with a fresh one.
    """
    attempts = 20 if port == 0 and len(hosts) > 1 else 1
    for attempt in range(attempts):
        servers: list[asyncio.Server] = []
        bound = port
        try:
            for host in hosts:
                srv = await asyncio.start_server(handler.connection, host, bound, backlog=4096, limit=_MAX_HEADER_BYTES)
                servers.append(srv)
                bound = srv.sockets[0].getsockname()[1]
            return servers, bound
        except OSError:
            for srv in servers:
                srv.close()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def _serve_forever(root: Path, hosts: Sequence[str], port: int, verbose: bool, parent_watch: bool) -> None:
    handler = _Handler(root, verbose)
    servers, port = await _bind(handler, hosts, port)
    handler.port = port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_watch:
        # LoopbackServer keeps our stdin open; EOF means the parent is gone (even after SIGKILL),
        # so exit instead of lingering as an orphan.
        def watch() -> None:
            # os.read on the raw descriptor: a thread blocked inside sys.stdin's buffered reader
            # would abort the interpreter at shutdown (it holds the buffer's lock).
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    print(f"PORT {port}", flush=True)
    await stop.wait()
    for srv in servers:
        srv.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.loopback",
        description="Misbehaving-on-demand HTTP/1.1 file server on loopback (tests, demo, benchmarks).",
    )
    parser.add_argument("--root", required=True, type=Path, help="directory to serve")
    parser.add_argument("--host", action="append", help="address to bind (repeatable; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = ephemeral, the default)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--parent-watch", action="store_true", help="exit when stdin reaches EOF (used by LoopbackServer)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: --root {args.root} is not a directory", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is out of range", file=sys.stderr)
        return 2
    _raise_fd_limit()
    try:
        asyncio.run(_serve_forever(args.root, args.host or ["127.0.0.1"], args.port, args.verbose, args.parent_watch))
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


# -- the Python API ---------------------------------------------------------------------------


class LoopbackError(RuntimeError):
    """The loopback server could not be started or queried."""


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


class LoopbackServer:
    """The loopback server in a subprocess; a context manager.

    >>> with LoopbackServer(root) as srv:
    ...     url = srv.url("images/a.jpg", fail=2, k="row7")
    """

    def __init__(self, root: Path | str, hosts: Sequence[str] = ("127.0.0.1",)) -> None:
        if not hosts:
            raise ValueError("hosts must name at least one address")
        self.root = Path(root)
        self.hosts = tuple(hosts)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        """The server process id (tests and benchmarks measure its CPU), None before start."""
        return self._proc.pid if self._proc is not None else None

    @property
    def base_url(self) -> str:
        host = self.hosts[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def url(self, path: str, **params: object) -> str:
        query = urlencode({k: _param(v) for k, v in params.items()})
        return f"{self.base_url}/{quote(path.lstrip('/'), safe='/~')}" + (f"?{query}" if query else "")

    def start(self) -> "LoopbackServer":
        if self._proc is not None:
            raise LoopbackError("server already started")
        if not self.root.is_dir():
            raise LoopbackError(f"loopback root {self.root} is not a directory")
        cmd = [sys.executable, "-m", "engine.loopback", "--root", str(self.root), "--parent-watch"]
        for host in self.hosts:
            cmd += ["--host", host]
        env = dict(os.environ)
        # Importable even when the package is not installed (running from a source checkout).
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env
        )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc)  # also runs at interpreter exit
        try:
            self.port = self._read_port(proc)
        except BaseException:
            self.close()
            raise
        return self

    def _read_port(self, proc: subprocess.Popen[bytes]) -> int:
        assert proc.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LoopbackError(
                        f"loopback server did not report its port within {_START_TIMEOUT_S:.0f} s{self._stderr_tail()}"
                    )
                if sel.select(left):
                    data = os.read(proc.stdout.fileno(), 4096)
                    if not data:
                        proc.wait()
                        raise LoopbackError(
                            f"loopback server exited with code {proc.returncode} before listening{self._stderr_tail()}"
                        )
                    buf += data
        proc.stdout.close()
        line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
        if not line.startswith("PORT ") or not line[5:].isdigit():
            raise LoopbackError(f"loopback server printed {line!r} instead of 'PORT <n>'")
        return int(line[5:])

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read()[-2000:].decode(errors="replace").strip()
        return f"; stderr: {text}" if text else ""

    def _get(self, path: str) -> dict[str, object]:
        if self._proc is None:
            raise LoopbackError("server not started")
        host = self.hosts[0]
        # http.client, not urllib: urllib would honour http_proxy from the environment.
        conn = http.client.HTTPConnection(host, self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise LoopbackError(f"GET {path} answered {resp.status}")
            return json.loads(data)
        except OSError as exc:
            raise LoopbackError(f"GET {path} failed: {exc}") from exc
        finally:
            conn.close()

    def stats(self) -> dict:
        return self._get("/__stats")

    def reset_stats(self) -> None:
        self._get("/__reset")

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # terminates once; later calls are no-ops
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _param(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
