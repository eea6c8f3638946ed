"""Step 2 of the data flow: fetcher processes.

Each fetcher drives one libcurl multi handle with hundreds to thousands of transfers in
flight, on ``socket_action`` + epoll (the ``select()`` behind ``CurlMulti.select`` cannot watch
more than 1,024 descriptors). Bodies are written straight from libcurl's write callback into
this fetcher's own slots of the shared slab (:mod:`engine.ring`), so a body is never copied
through a pipe. Its MD5 is computed by the worker that decodes it, where the bytes are hot
anyway: there is one fetcher per routing cell, and hashing every body here cost half of
its CPU.

What the fetcher decides on its own, so the supervisor only sees final outcomes:
- politeness: per-host connection caps and per-host back-off after 429/503, so one slow or
  angry host never holds up the others;
- retries of transient failures with exponential back-off and jitter, honouring
  ``Retry-After``; a partial body is resumed with a Range request when the server allows it;
- verification of ``OriginalSize`` (``OriginalMD5`` is the worker's) and detection of Flickr's
  ``photo_unavailable`` placeholder.
A row waiting for a retry or for its host is parked: the multi handle keeps going.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import resource
import selectors
import time
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from multiprocessing.connection import Connection
from typing import NamedTuple, Sequence
from urllib.parse import urlsplit

import pycurl

from .autotune import Observation, TransferTuner, TuneConfig
from .config import FetchConfig
from .errors import RETRYABLE, Reason, reason_for_curl, reason_for_status
from .proc import pipeline_child
from .ring import Slab, SlotRange, slots_needed
from .board import Board
from .stats import HIST_DOWNLOAD_BASE, F, Role, Stats, StatsLayout

_CURLE_RANGE_ERROR = 33
_PLACEHOLDER_MARK = "photo_unavailable"
#: longest a fetcher sleeps in epoll before looking at its pipe and timers again
_MAX_WAIT_S = 0.2
#: libcurl's receive buffer per transfer (default 16 KiB): when the fetcher falls behind,
#: one read (one write callback: a Python call and a slab write) takes everything that piled
#: up on the socket instead of 16 KiB of it. A fetcher that keeps up still sees the ~16 KB
#: reads the sender's pace gives. Only the part a read fills is touched.
_RECV_BUFFER_BYTES = 256 * 1024
#: what the state DB records as the MD5 of a body that was not kept (failed transfers)
_EMPTY_MD5 = hashlib.md5(b"").hexdigest()
#: descriptors kept for everything that is not a connection (pipes, epoll, the DB, libs)
_SPARE_FDS = 128
#: share of the --ring-mb cap bodies in flight may take (so it caps the target); the rest is
#: for bodies waiting downstream for workers
_IN_FLIGHT_SHARE = 0.75
#: transfers shorter than this on average take a body's promised slots all at once (see
#: Fetcher.whole_promise); longer ones one by one as bytes arrive
_WHOLE_PROMISE_S = 1.0
#: seconds of the workers' work that may wait downstream before the fetcher stops starting
_DOWNSTREAM_S = 1.0
#: shrink the ring's memory when its usable size fell this much since the last time...
_TRIM_RATIO = 0.75
#: ...but not more often than this
_TRIM_EVERY_S = 5.0


class FetchJob(NamedTuple):
    """What a fetcher needs to know about a row (kept small: it is pickled per row)."""

    seq: int
    url: str
    expected_size: int | None
    md5_hex: str | None
    #: an original already on disk (--originals-dir / --check-md5-if-exists): used when it
    #: verifies, so the row needs no network at all; the URL is the fallback
    local_path: str | None = None


class FetchInfo(NamedTuple):
    url: str  # effective URL after redirects
    attempts: int
    content_type: str
    download_s: float
    md5_hex: str


@dataclass
class _Host:
    active: int = 0
    backoff_until: float = 0.0
    queued: int = 0


class _Attempt:
    """A row in this fetcher: survives retries, carries the partial body for Range resume."""

    __slots__ = (
        "job",
        "host",
        "attempts",
        "slots",
        "nbytes",
        "first_start",
        "t_start",
        "status",
        "ctype",
        "retry_after",
        "accept_ranges",
        "too_large",
        "discard",
        "curl",
        "resume_from",
        "total",
        "paused",
        "promised",
    )

    def __init__(self, job: FetchJob, host: str) -> None:
        self.job = job
        self.host = host
        self.attempts = 0
        self.slots: list[int] = []
        self.nbytes = 0
        self.first_start = 0.0
        self.t_start = 0.0
        self.status = 0
        self.ctype = ""
        self.retry_after: float | None = None
        self.accept_ranges = False
        self.too_large = False
        self.discard = False
        self.curl: pycurl.Curl | None = None
        self.resume_from = 0
        self.total = -1  # expected body size (resume offset + Content-Length), -1 unknown: for the UIs
        self.paused = False  # waiting in Fetcher.paused for a free slot
        self.promised = 0  # free slots set aside for this body's next bytes (see Fetcher.promised)

    def reset_body(self) -> list[int]:
        freed = self.slots
        self.slots = []
        self.nbytes = 0
        self.resume_from = 0
        return freed


def parse_retry_after(value: str, now_wall: float) -> float | None:
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now_wall)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Fetcher:
    def __init__(
        self,
        index: int,
        conn: Connection,
        cfg: FetchConfig,
        slab: Slab,
        slots: SlotRange,
        free: list[int],
        stats: Stats,
    ) -> None:
        self.index = index
        self.conn = conn
        self.cfg = cfg
        self.slab = slab
        self.slot_range = slots
        self.free = free  # a stack: LIFO keeps few pages hot
        self.stats = stats
        n = max(1, cfg.fetchers)
        self.host_cap = max(1, -(-cfg.max_host_connections // n))
        # Connections beyond the descriptors we may open would fail as "connect" errors.
        self.connection_cap = max(1, min(-(-cfg.max_connections // n), _raise_fd_limit() - _SPARE_FDS))
        # Transfers in flight: a target found while running (engine.autotune), --transfers its cap.
        # The workers it measures are the run's (every cell's): its share is 1 / every fetcher.
        self.tuner = TransferTuner(TuneConfig(cap=max(1, cfg.transfers)), share=1.0 / max(n, stats.layout.fetchers))
        self.transfers = self.tuner.target
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._socket_cb)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._timer_cb)
        self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, self.connection_cap)
        self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, self.host_cap)
        self.multi.setopt(pycurl.M_MAXCONNECTS, max(16, self.connection_cap))
        self.sel = selectors.EpollSelector()
        self.sel.register(conn.fileno(), selectors.EVENT_READ, data=None)
        self.timer_due: float | None = None
        self.hosts: dict[str, _Host] = {}
        self.queues: dict[str, deque[_Attempt]] = {}
        self.queued = 0  # rows in all per-host queues (summing them each loop turn is O(hosts))
        self.host_order: deque[str] = deque()
        self.parked: list[tuple[float, int, _Attempt]] = []
        self.active: dict[pycurl.Curl, _Attempt] = {}
        # Transfers paused for want of a slot, oldest first. Entries of transfers that ended
        # meanwhile stay until popped (their ``paused`` is False): removal from the middle
        # would cost O(paused) per transfer.
        self.paused: deque[_Attempt] = deque()
        self.paused_n = 0
        # Our slots now held by the supervisor, a worker or the writer. When none are and the
        # ring is full, no slot will ever come back: see _resume_paused.
        self.downstream = len(slots) - len(free)
        # Free slots promised to transfers in flight for their expected bodies, taken only as
        # bytes arrive: a body reserves its room when it starts (so the ring never fills with
        # half-bodies that all wait for a slot), but only the pages of bytes received are
        # touched. A slow body is half there on average, so the in-flight memory is about
        # half what the promises add up to. Always <= len(self.free).
        self.promised = 0
        # While transfers are short (fast hosts: memory is not what binds), a body takes its
        # whole promise with its first bytes: consecutive slots, so no copy in the worker.
        self.whole_promise = True
        # What to promise a body of unknown size (plain URL lists), learnt as bodies come;
        # a body larger than its promise takes more slots as it arrives.
        self.mean_body_bytes = 256 * 1024.0
        self.reserve_cap = max(1, len(slots) // 8)
        # The segment holds --ring-mb per fetcher; the part we let ourselves use follows the
        # transfer target (_tune), so memory follows what the run needs, not the cap.
        self.usable = len(slots)
        self.downstream_cap = max(1, len(slots) // 4)
        self.trimmed_at = len(slots)  # largest usable size since memory was last given back
        self.next_trim = 0.0
        self._resize_ring()
        self.handles: list[pycurl.Curl] = []
        self.outstanding_want = 0
        self.stopping = False
        self.jobs_held = 0
        self.dl_bytes = 0
        self.board = Board.of(stats).fetcher(index)
        self.out: list[tuple] = []  # messages to the supervisor, sent once per loop turn

    # -- libcurl callbacks --------------------------------------------------------------
    def _socket_cb(self, what: int, fd: int, multi: object, socketp: object) -> None:
        if what == pycurl.POLL_REMOVE:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            return
        ev = 0
        if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
            ev |= selectors.EVENT_READ
        if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
            ev |= selectors.EVENT_WRITE
        try:
            self.sel.modify(fd, ev, data=True)
        except KeyError:
            self.sel.register(fd, ev, data=True)

    def _timer_cb(self, timeout_ms: int) -> None:
        self.timer_due = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0

    def _make_writer(self, a: _Attempt):
        slab = self.slab
        slot_bytes = slab.slot_bytes
        cap = self.cfg.max_body_bytes
        free = self.free
        paused = self.paused

        def write(data: bytes) -> int | None:
            n = len(data)
            if a.discard:  # an error page or a redirect body: not ours to keep
                return None
            if a.nbytes + n > cap:
                a.too_large = True
                return 0
            need = -(-(a.nbytes + n) // slot_bytes) - len(a.slots)
            if need > 0:
                if not a.slots and self.whole_promise:
                    need = max(need, a.promised)  # all at once: consecutive slots
                # beyond its promise (a body larger than expected), a body takes only free
                # slots nobody was promised
                if need > a.promised and self._unpromised() < need - a.promised:
                    # Backpressure: the ring is full downstream. Pause this transfer (libcurl
                    # keeps the chunk and redelivers it) instead of buffering in memory.
                    if not a.paused:
                        a.paused = True
                        self.paused_n += 1
                        paused.append(a)
                    return pycurl.WRITEFUNC_PAUSE
                kept = min(need, a.promised)
                a.promised -= kept
                self.promised -= kept
                for _ in range(need):
                    a.slots.append(free.pop())
            slab.write(a.slots, data, a.nbytes)
            a.nbytes += n
            self.dl_bytes += n
            return None

        return write

    def _make_header(self, a: _Attempt):
        def header(line: bytes) -> None:
            if line.startswith(b"HTTP/"):
                # a new response (first, after a redirect, or after 100-continue): reset
                parts = line.split(None, 2)
                try:
                    a.status = int(parts[1])
                except (IndexError, ValueError):
                    a.status = 0
                a.ctype = ""
                a.retry_after = None
                a.discard = not (200 <= a.status < 300)
                a.total = -1
                return
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-type":
                a.ctype = value.strip().decode("latin-1")
            elif key == b"retry-after":
                a.retry_after = parse_retry_after(value.decode("latin-1"), time.time())
            elif key == b"accept-ranges":
                a.accept_ranges = value.strip().lower() == b"bytes"
            elif key == b"content-length" and value.strip().isdigit():
                a.total = a.resume_from + int(value)

        return header

    # -- transfer lifecycle ---------------------------------------------------------------
    def _new_handle(self) -> pycurl.Curl:
        if self.handles:
            return self.handles.pop()
        c = pycurl.Curl()
        cfg = self.cfg
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, cfg.max_redirects)
        # Only http and https, also after a redirect: never file://, ftp://, gopher://...
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(cfg.connect_timeout_s * 1000))
        c.setopt(pycurl.TIMEOUT_MS, int(cfg.timeout_s * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, cfg.low_speed_bps)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(cfg.low_speed_time_s)))
        c.setopt(pycurl.MAXFILESIZE_LARGE, cfg.max_body_bytes)
        c.setopt(pycurl.USERAGENT, cfg.user_agent)
        c.setopt(pycurl.ACCEPT_ENCODING, "")  # gzip/deflate/br decoded by libcurl
        c.setopt(pycurl.PIPEWAIT, 1)  # prefer multiplexing on an HTTP/2 connection
        c.setopt(pycurl.DNS_CACHE_TIMEOUT, 600)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.BUFFERSIZE, _RECV_BUFFER_BYTES)
        if cfg.resolve:
            c.setopt(pycurl.RESOLVE, list(cfg.resolve))
        if cfg.insecure:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
        return c

    def _start(self, a: _Attempt) -> None:
        c = self._new_handle()
        a.curl = c
        a.attempts += 1
        now = time.monotonic()
        if not a.first_start:
            a.first_start = now
        a.t_start = now
        a.status = 0
        a.too_large = False
        a.discard = False
        c.setopt(pycurl.URL, a.job.url)
        c.setopt(pycurl.WRITEFUNCTION, self._make_writer(a))
        c.setopt(pycurl.HEADERFUNCTION, self._make_header(a))
        c.setopt(pycurl.RESUME_FROM_LARGE, a.nbytes)
        a.resume_from = a.nbytes
        self.hosts[a.host].active += 1
        self.active[c] = a
        self.multi.add_handle(c)

    def _load_local(self, a: _Attempt) -> bool:
        """Take the body from a file on disk if it is there and verifies; else use the URL."""
        path = a.job.local_path
        a.job = a.job._replace(local_path=None)  # one look only: a retry goes to the network
        assert path is not None
        try:
            size = os.path.getsize(path)
            if size == 0 or size > self.cfg.max_body_bytes:
                return False
            if a.job.expected_size is not None and size != a.job.expected_size:
                return False
            need = slots_needed(size, self.slab.slot_bytes)
            if self._unpromised() < need:
                return False
            slots = [self.free.pop() for _ in range(need)]
            md5 = hashlib.md5()
            pos = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.slab.write(slots, chunk, pos)
                    md5.update(chunk)
                    pos += len(chunk)
        except OSError:
            return False
        if pos != size or (a.job.md5_hex is not None and md5.hexdigest() != a.job.md5_hex):
            self._free(slots)
            return False
        a.slots, a.nbytes = slots, pos
        a.first_start = time.monotonic()
        self._send_body(a, "file://" + path)
        return True

    def _release(self, c: pycurl.Curl) -> _Attempt:
        a = self.active.pop(c)
        self.multi.remove_handle(c)
        a.curl = None
        self.promised -= a.promised  # a retry promises again when it starts
        a.promised = 0
        h = self.hosts[a.host]
        h.active -= 1
        if a.paused:
            a.paused = False
            self.paused_n -= 1
        self.handles.append(c)
        if not h.active and not self.queues.get(a.host) and h.backoff_until <= time.monotonic():
            # Forget idle hosts: a URL list can name millions of them, memory must not grow.
            del self.hosts[a.host]
            self.queues.pop(a.host, None)
        return a

    def _finish(self, c: pycurl.Curl, errno: int, errmsg: str) -> None:
        a = self.active[c]
        code = c.getinfo(pycurl.RESPONSE_CODE)
        eff = c.getinfo(pycurl.EFFECTIVE_URL) or a.job.url
        self._release(c)
        elapsed = time.monotonic() - a.t_start
        self.stats.add(F.TRANSFERS_DONE)
        self.stats.observe(HIST_DOWNLOAD_BASE, elapsed)
        self.tuner.transfer_done(elapsed)
        reason: Reason | None
        detail = ""
        if errno:
            if a.too_large:
                reason, detail = Reason.TOO_LARGE, f"body over {self.cfg.max_body_bytes} bytes"
            elif errno == _CURLE_RANGE_ERROR:
                # The server ignored our Range request: start again from byte 0, now.
                self._free(a.reset_body())
                a.attempts -= 1
                self._enqueue(a)
                return
            else:
                reason, detail = reason_for_curl(errno, errmsg), errmsg
                if reason is Reason.BAD_REDIRECT:
                    detail = f"redirect to a scheme other than http/https: {errmsg}"
        elif not (200 <= code < 300):
            reason = reason_for_status(code)
            detail = f"HTTP {code} from {eff}"
        elif _PLACEHOLDER_MARK in eff:
            reason, detail = Reason.UNAVAILABLE, f"redirected to placeholder {eff}"
        elif a.resume_from and code != 206:
            # A 200 to a Range request would restart the body; libcurl flags it as error 33,
            # but a server may also say 200 with the remainder: never trust that.
            self._free(a.reset_body())
            self._enqueue(a)
            return
        else:
            reason = self._verify(a)
            detail = "" if reason is None else self._verify_detail(a, reason)
        if reason is None:
            self._send_body(a, eff)
            return
        if reason in RETRYABLE and self._retry(a, reason):
            return
        self._free(a.reset_body())
        self.jobs_held -= 1
        self.out.append(("fail", a.job.seq, reason.value, detail, self._info(a, eff)))

    def _verify(self, a: _Attempt) -> Reason | None:
        if a.nbytes == 0:
            return Reason.EMPTY
        if not self.cfg.verify:
            return None
        job = a.job
        if job.expected_size is not None and a.nbytes != job.expected_size:
            return Reason.SIZE_MISMATCH
        return None  # OriginalMD5: checked by the worker (see the module docstring)

    @staticmethod
    def _verify_detail(a: _Attempt, reason: Reason) -> str:
        if reason is Reason.SIZE_MISMATCH:
            return f"got {a.nbytes} bytes, list says {a.job.expected_size}"
        return "empty body"

    def _retry(self, a: _Attempt, reason: Reason) -> bool:
        cfg = self.cfg
        if a.attempts > cfg.max_retries:
            return False
        now = time.monotonic()
        host = self.hosts.setdefault(a.host, _Host())  # _release may have forgotten it
        delay = min(cfg.retry_max_s, cfg.retry_base_s * (2 ** (a.attempts - 1)))
        delay *= random.uniform(0.5, 1.0)  # jitter: retries of one burst do not come back together
        if reason in (Reason.HTTP_429, Reason.HTTP_5XX):
            # The host is overloaded or rate limiting: slow that host, not the others.
            pause = a.retry_after if a.retry_after is not None else cfg.host_backoff_s
            pause = min(pause, cfg.retry_max_s)
            host.backoff_until = max(host.backoff_until, now + pause)
            delay = max(delay, pause)
        if a.retry_after is not None:
            delay = max(delay, min(a.retry_after, cfg.retry_max_s))
        if not (a.nbytes and a.accept_ranges and reason in (Reason.TRUNCATED, Reason.RESET, Reason.STALLED, Reason.TIMEOUT)):
            # keep the partial body only when the server said it can resume it
            self._free(a.reset_body())
        self.stats.add(F.RETRIES)
        heapq.heappush(self.parked, (now + delay, a.job.seq, a))
        return True

    def _send_body(self, a: _Attempt, eff: str) -> None:
        self.jobs_held -= 1
        keep = slots_needed(a.nbytes, self.slab.slot_bytes)
        if len(a.slots) > keep:  # a whole promise taken for a larger body than came
            self._free(a.slots[keep:])
        slots = tuple(a.slots[:keep])
        self.mean_body_bytes += (a.nbytes - self.mean_body_bytes) / 32
        self.board.handed_on(a.job.seq, a.job.url)
        a.slots = []
        self.downstream += len(slots)
        self.out.append(("body", a.job.seq, slots, a.nbytes, self._info(a, eff)))

    def _info(self, a: _Attempt, eff: str) -> FetchInfo:
        # a body's MD5 comes from the worker; a failed transfer kept no body
        md5 = "" if a.nbytes else _EMPTY_MD5
        return FetchInfo(eff, a.attempts, a.ctype, time.monotonic() - a.first_start, md5)

    def _unpromised(self) -> int:
        """Free slots no transfer in flight was promised: what a new body may count on."""
        return len(self.free) - self.promised

    def _free(self, slots: Sequence[int]) -> None:
        # pushed last slot first, so the next body pops them in ascending order: consecutive
        # slots reach the worker's decoder as one view of the slab, without a copy
        self.free.extend(reversed(slots))

    # -- scheduling ---------------------------------------------------------------------
    def _enqueue(self, a: _Attempt) -> None:
        if a.host not in self.hosts:
            self.hosts[a.host] = _Host()
        q = self.queues.get(a.host)
        if q is None:
            q = self.queues[a.host] = deque()
        self.queued += 1
        if not q:
            self.host_order.append(a.host)
        q.append(a)

    def _add_jobs(self, jobs: list[FetchJob]) -> None:
        self.outstanding_want = max(0, self.outstanding_want - len(jobs))
        for job in jobs:
            self.jobs_held += 1
            self._enqueue(_Attempt(job, urlsplit(job.url).netloc.lower()))

    def _start_more(self) -> None:
        budget = self.transfers - len(self.active)
        now = time.monotonic()
        order = self.host_order
        skipped = 0
        # Start nothing while transfers wait for slots: a new one would only take slots from
        # bodies that are further along (and the ring would fill with half-bodies).
        # Nor while a quarter of the ring already waits downstream for workers: that is
        # seconds of decoding queued, and more would only grow every process's footprint.
        if self.downstream > self.downstream_cap:
            return
        # Room within the usable ring; when none of our slots is in use anything that fits
        # the free list may start (a body larger than the usable ring must not wait forever).
        committed = len(self.slot_range) - len(self.free) + self.promised
        room = self.usable - committed if committed else len(self.free)
        while budget > 0 and order and skipped < len(order) and self.free and not self.paused_n:
            host = order[0]
            q = self.queues[host]
            h = self.hosts[host]
            if h.active >= self.host_cap or h.backoff_until > now:
                order.rotate(-1)
                skipped += 1
                continue
            a = q[0]
            want = self._slots_to_reserve(a)
            if want > self._unpromised() or want > room:
                break  # the ring is spoken for: wait until bodies move on
            q.popleft()
            self.queued -= 1
            if not q:
                order.popleft()
            else:
                order.rotate(-1)
            skipped = 0
            if a.job.local_path and self._load_local(a):
                continue
            a.promised = want
            self.promised += want
            room -= want
            self._start(a)
            budget -= 1

    def _slots_to_reserve(self, a: _Attempt) -> int:
        """Slots promised to a transfer before it starts: room for its whole expected body.

        Without this, 2,000 slow transfers each wrote their first chunks, the ring filled
        with half-bodies and every transfer paused, waiting for a slot none would free.
        """
        size = a.job.expected_size or int(self.mean_body_bytes)
        want = min(slots_needed(size, self.slab.slot_bytes), self.reserve_cap)
        return max(0, want - len(a.slots))

    # -- how many in flight (engine.autotune) ------------------------------------------
    def _tune(self, now: float) -> None:
        if not self.tuner.due(now):
            return
        done, busy_s = self.stats.workers_processing()
        self.transfers = self.tuner.update(
            Observation(
                now=now,
                workers=self.stats.layout.workers,
                workers_busy_s=busy_s,
                workers_done=done,
                bodies_waiting=self.stats.supervisors_total(F.QUEUED_BODIES),  # every cell's
                in_flight=len(self.active),
                memory_limit=max(1, int(len(self.slot_range) * _IN_FLIGHT_SHARE / self._slots_per_body())),
                connection_limit=self.connection_cap,
            )
        )
        self._resize_ring()
        self.whole_promise = (self.tuner.transfer_s or 0.0) < _WHOLE_PROMISE_S
        self.stats.set(F.TRANSFERS_TARGET, self.transfers)
        self.stats.set(F.OWNED_SLOTS, self.usable)
        self.trimmed_at = max(self.trimmed_at, self.usable)  # the peak since memory was last given back
        if self.usable < self.trimmed_at * _TRIM_RATIO and now >= self.next_trim:
            self._trim(now)

    def _slots_per_body(self) -> float:
        # a body fills its last slot half on average
        return max(1.0, self.mean_body_bytes / self.slab.slot_bytes + 0.5)

    def _resize_ring(self) -> None:
        """The usable ring: the target's bodies in flight, plus room for bodies waiting downstream.

        Downstream room: a third of the in-flight part, and at least a second of the workers'
        work (bodies that arrived while the workers were busy are what keeps them busy next).
        """
        spb = self._slots_per_body()
        flight = self.transfers * spb
        rate = self.tuner.workers_rate or 0.0
        down = max(flight / 3, rate * self.tuner.share * _DOWNSTREAM_S * spb, 8 * spb)
        n = len(self.slot_range)
        self.downstream_cap = max(1, min(n // 4, int(down)))
        self.usable = max(1, min(n, int(flight) + self.downstream_cap))

    def _trim(self, now: float) -> None:
        """Give back the memory of free slots the smaller usable ring will not reach.

        The free list is a stack: the slots taken next are at its top, so the ones at the
        bottom, beyond the room the usable size leaves, are cold (their pages may still hold
        old bodies).
        """
        in_use = len(self.slot_range) - len(self.free)
        keep = max(0, self.usable - in_use)
        cold = len(self.free) - keep
        if cold > 0:
            self.slab.release(self.free[:cold])
        self.trimmed_at = self.usable
        self.next_trim = now + _TRIM_EVERY_S

    def _unpark(self) -> None:
        now = time.monotonic()
        while self.parked and self.parked[0][0] <= now:
            _, _, a = heapq.heappop(self.parked)
            self._enqueue(a)

    def _resume_paused(self) -> None:
        paused = self.paused
        # Resume oldest first, one at a time, and only while slots are free: resuming every
        # paused transfer whenever one slot came back made all of them re-pause at once, O(paused)
        # work per loop turn (60 % of a fetcher with 2,000 slow transfers). A transfer that
        # re-pauses inside pause(CONT) goes to the back; at most one pass over the queue.
        progressed = False
        for _ in range(len(paused)):
            if not self._unpromised():
                break
            a = paused.popleft()
            if not a.paused or a.curl is None:
                continue  # ended while it waited
            a.paused = False
            self.paused_n -= 1
            a.curl.pause(pycurl.PAUSE_CONT)
            progressed |= not a.paused
        if progressed or not self.paused_n or self.paused_n < len(self.active) or self.downstream > 0:
            return
        # Every transfer is paused, the free slots (if any) are too few for any of them, and
        # none of ours is downstream: nothing will ever come back, every slot sits in a paused
        # transfer or a parked partial body. Abort the paused transfer with the least data so
        # the others can finish; it starts again from byte 0 later.
        victim = min((x for x in paused if x.paused), key=lambda x: x.nbytes)
        assert victim.curl is not None
        self._release(victim.curl)
        self._free(victim.reset_body())
        victim.attempts -= 1
        self._enqueue(victim)

    def _want_more(self) -> None:
        target = 2 * self.transfers  # rows in hand: the transfers in flight and as many queued
        held = self.queued + len(self.active) + len(self.parked) + self.outstanding_want
        if held < target and not self.stopping:
            n = target - held
            if n >= max(1, self.transfers // 4) or held == 0:
                self.outstanding_want += n
                self.out.append(("want", n))

    # -- main loop ----------------------------------------------------------------------
    def _drain_conn(self) -> None:
        while self.conn.poll():
            for msg in self.conn.recv():
                kind = msg[0]
                if kind == "jobs":
                    self._add_jobs(msg[1])
                elif kind == "slots":
                    self._free(msg[1])
                    self.downstream -= len(msg[1])
                elif kind == "stop":
                    self.stopping = True
                    return

    def _action(self, fd: int, flags: int) -> None:
        while True:
            ret, _ = self.multi.socket_action(fd, flags)
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break

    def _read_done(self) -> None:
        while True:
            nq, ok, err = self.multi.info_read()
            for c in ok:
                self._finish(c, 0, "")
            for c, errno, msg in err:
                self._finish(c, errno, msg)
            if nq == 0:
                break

    def run(self) -> None:
        stats = self.stats
        self._tune(time.monotonic())  # the caps and the memory limit bind from the start
        self._want_more()
        while not self.stopping:
            now = time.monotonic()
            wait = _MAX_WAIT_S
            if self.timer_due is not None:
                wait = min(wait, max(0.0, self.timer_due - now))
            if self.parked:
                wait = min(wait, max(0.0, self.parked[0][0] - now))
            for key, mask in self.sel.select(wait):
                if key.data is None:
                    try:
                        self._drain_conn()
                    except (EOFError, OSError):
                        return  # the supervisor is gone
                else:
                    flags = 0
                    if mask & selectors.EVENT_READ:
                        flags |= pycurl.CSELECT_IN
                    if mask & selectors.EVENT_WRITE:
                        flags |= pycurl.CSELECT_OUT
                    self._action(key.fd, flags)
            if self.timer_due is not None and self.timer_due <= time.monotonic():
                self.timer_due = None
                self._action(pycurl.SOCKET_TIMEOUT, 0)
            self._read_done()
            self._tune(now)
            self._unpark()
            self._resume_paused()
            self._start_more()
            self._want_more()
            if self.out:
                self.conn.send(self.out)
                self.out = []
            stats.add(F.DOWNLOADED_BYTES, self.dl_bytes)
            self.dl_bytes = 0
            stats.set(F.DOWNLOADS_IN_PROGRESS, len(self.active))
            stats.set(F.PARKED, len(self.parked) + self.queued)
            # the ring as the UIs show it: the usable part (the segment is sized for the cap)
            stats.set(F.FREE_SLOTS, max(0, self._unpromised() - (len(self.slot_range) - self.usable)))
            stats.set(F.HEARTBEAT_MS, int(time.monotonic() * 1000))
            self.board.publish(self.active.values(), now)
        for c in list(self.active):
            self._release(c)
        self.multi.close()


def _raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (often 1,024 vs 1M); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fetcher_main(
    index: int,
    conn: Connection,
    cfg: FetchConfig,
    slab_name: str,
    slot_bytes: int,
    slots: SlotRange,
    free: list[int],
    layout: StatsLayout,
) -> None:
    with pipeline_child(f"fetcher-{index}", slab_name, slot_bytes, layout, Role.FETCHER, index) as (slab, stats):
        Fetcher(index, conn, cfg, slab, slots, free, stats).run()
