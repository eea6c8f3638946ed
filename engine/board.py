"""The "board": what is happening right now, per image, in shared memory.

The stats matrix (:mod:`engine.stats`) holds numbers; the board holds the few *named* things
the UIs list: transfers in flight with their progress, the image each worker has in hand,
and the last finished rows (ok with the path of their smallest file, failed with their
reason). It lives in the stats segment, after the matrix, so it has the same owner and the
same lifetime: created and unlinked by the supervisor only.

Every section has exactly one writing process, and writes are plain stores into fixed-size
numpy records, so there are no locks:

- fetcher *i*: its transfers section, rewritten in bulk at most twice a second from its own
  bookkeeping (bytes counted in the write callback, Content-Length from the header
  callback: ``getinfo`` is forbidden inside callbacks), plus a ring of bodies it handed on,
  which lets a reader name the image a worker is processing (workers only know a sequence
  number);
- worker *j*: one record, set when an image is taken and cleared when it is done;
- each writer (one per routing cell): two rings of finished rows (ok / failed), appended
  after each commit; readers merge the writers' rings by time.

Per-event cost is around a microsecond (one record store). Readers (the monitor process)
copy a section and check a generation counter or a ring head to drop torn records; a UI can
afford to show a row half a second late, never to slow the data path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np

from .errors import ALL_REASONS
from .layout import ORIGINAL

#: transfers shown per fetcher (the gauge counts all of them; a UI lists a few dozen)
TRANSFERS_PER_FETCHER = 64
#: bodies remembered per fetcher so a worker's image can be named
HANDED_PER_FETCHER = 256
#: finished rows kept per status (the UIs show the last 100)
FINISHED_RING = 128
NAME_BYTES = 64
TEXT_BYTES = 160
#: how often a fetcher rewrites its transfers section
PUBLISH_EVERY_S = 0.5

_REASON_CODE = {r: i for i, r in enumerate(ALL_REASONS)}

_TRANSFER = np.dtype([("seq", "i8"), ("nbytes", "i8"), ("total", "i8"), ("t0", "f8"), ("name", f"S{NAME_BYTES}")])
_HANDED = np.dtype([("seq", "i8"), ("name", f"S{NAME_BYTES}")])
_RESIZE = np.dtype([("seq", "i8"), ("nbytes", "i8"), ("t0", "f8")])
_FINISHED = np.dtype(
    [
        ("t", "f8"),  # wall-clock time of the commit
        ("nbytes", "i8"),  # downloaded body size
        ("width", "i4"),
        ("height", "i4"),
        ("reason", "i2"),  # index into ALL_REASONS, -1 for ok
        ("name", f"S{NAME_BYTES}"),
        ("text", f"S{TEXT_BYTES}"),  # ok: relative path of the smallest file; failed: detail
    ]
)
# per fetcher header: generation (odd while writing), count of listed transfers, handed head
_FETCH_HDR = 3


def _align(n: int) -> int:
    return (n + 63) & ~63


@dataclass(frozen=True)
class _Offsets:
    fetch_hdr: int
    transfers: int
    handed: int
    resizes: int
    finished_hdr: int
    ok: int
    failed: int
    size: int


def _offsets(fetchers: int, workers: int, writers: int = 1) -> _Offsets:
    o = 0
    fetch_hdr = o
    o = _align(o + fetchers * _FETCH_HDR * 8)
    transfers = o
    o = _align(o + fetchers * TRANSFERS_PER_FETCHER * _TRANSFER.itemsize)
    handed = o
    o = _align(o + fetchers * HANDED_PER_FETCHER * _HANDED.itemsize)
    resizes = o
    o = _align(o + workers * _RESIZE.itemsize)
    finished_hdr = o
    o = _align(o + writers * 2 * 8)
    ok = o
    o = _align(o + writers * FINISHED_RING * _FINISHED.itemsize)
    failed = o
    o = _align(o + writers * FINISHED_RING * _FINISHED.itemsize)
    return _Offsets(fetch_hdr, transfers, handed, resizes, finished_hdr, ok, failed, o)


def board_bytes(fetchers: int, workers: int, writers: int = 1) -> int:
    return _offsets(fetchers, workers, writers).size


def name_of_url(url: str) -> bytes:
    """A short display name for a transfer: the URL's last path part."""
    tail = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or url
    return tail[-NAME_BYTES:].encode("utf-8", "replace")[:NAME_BYTES]


def _clip(text: str | None, n: int) -> bytes:
    return (text or "").encode("utf-8", "replace")[:n]


def _s(b: bytes) -> str:
    return b.decode("utf-8", "replace")


class _TransferLike(Protocol):
    """What a fetcher's in-flight attempt offers (engine.fetcher._Attempt)."""

    nbytes: int
    total: int
    t_start: float

    @property
    def job(self): ...  # noqa: ANN201 - a FetchJob (seq, url, ...)


class _FinishedRow(Protocol):
    image_id: str
    status: str
    reason: str | None
    detail: str | None
    nbytes: int | None
    width: int | None
    height: int | None
    outputs: Sequence


class Board:
    """Typed views of the board area of a shared buffer (the stats segment)."""

    def __init__(self, buf: memoryview, offset: int, fetchers: int, workers: int, writers: int = 1) -> None:
        off = _offsets(fetchers, workers, writers)
        self.fetchers = fetchers
        self.workers = workers
        self.writers = writers

        def arr(dtype: np.dtype | type, count: int, at: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
            a = np.ndarray((count,), dtype=dtype, buffer=buf, offset=offset + at)
            return a.reshape(shape) if shape else a

        self.fetch_hdr = arr(np.int64, fetchers * _FETCH_HDR, off.fetch_hdr, (fetchers, _FETCH_HDR))
        self.transfers = arr(_TRANSFER, fetchers * TRANSFERS_PER_FETCHER, off.transfers,
                             (fetchers, TRANSFERS_PER_FETCHER))
        self.handed = arr(_HANDED, fetchers * HANDED_PER_FETCHER, off.handed, (fetchers, HANDED_PER_FETCHER))
        self.resizes = arr(_RESIZE, workers, off.resizes)
        # per writer: heads of its ok and failed rings, and the rings
        self.finished_hdr = arr(np.int64, writers * 2, off.finished_hdr, (writers, 2))
        self.ok = arr(_FINISHED, writers * FINISHED_RING, off.ok, (writers, FINISHED_RING))
        self.failed = arr(_FINISHED, writers * FINISHED_RING, off.failed, (writers, FINISHED_RING))

    @classmethod
    def of(cls, stats) -> "Board":  # noqa: ANN001 - engine.stats.Stats (import cycle)
        lay = stats.layout
        return cls(stats.buf, stats.board_offset, lay.fetchers, lay.workers, lay.cells)

    # -- writers --------------------------------------------------------------------------
    def fetcher(self, index: int) -> "FetcherBoard":
        return FetcherBoard(self, index)

    def worker(self, index: int) -> "WorkerBoard":
        return WorkerBoard(self, index)

    def writer(self, index: int = 0) -> "WriterBoard":
        return WriterBoard(self, index)

    # -- readers --------------------------------------------------------------------------
    def read_transfers(self) -> list[dict]:
        """Transfers in flight (up to TRANSFERS_PER_FETCHER per fetcher), oldest first."""
        out: list[dict] = []
        now = time.monotonic()
        for i in range(self.fetchers):
            hdr = self.fetch_hdr[i]
            rows = None
            for _ in range(5):  # a torn copy is retried; after that, show what we have
                g1 = int(hdr[0])
                n = int(hdr[1])
                rows = self.transfers[i, :n].copy()
                if g1 % 2 == 0 and int(hdr[0]) == g1:
                    break
            for r in rows if rows is not None else ():
                total = int(r["total"])
                nbytes = int(r["nbytes"])
                out.append(
                    {
                        "name": _s(r["name"]),
                        "fetcher": i,
                        "bytes": nbytes,
                        "total": total if total > 0 else None,
                        "pct": min(100.0, 100.0 * nbytes / total) if total > 0 else None,
                        "age_s": max(0.0, now - float(r["t0"])),
                    }
                )
        out.sort(key=lambda t: -t["age_s"])
        return out

    def _handed_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for i in range(self.fetchers):
            for r in self.handed[i]:
                if r["seq"] > 0:
                    names[int(r["seq"])] = _s(r["name"])
        return names

    def read_resizes(self) -> list[dict]:
        """The image each busy worker has in hand."""
        now = time.monotonic()
        rows = self.resizes.copy()
        names = self._handed_names() if (rows["seq"] > 0).any() else {}
        out = []
        for j, r in enumerate(rows):
            seq = int(r["seq"])
            if seq <= 0:
                continue
            out.append(
                {"worker": j, "name": names.get(seq, f"#{seq}"), "bytes": int(r["nbytes"]),
                 "age_s": max(0.0, now - float(r["t0"]))}
            )
        return out

    def read_finished(self, ok: bool, limit: int = 100) -> list[dict]:
        """The last ``limit`` finished rows of one status, newest first (all writers merged)."""
        out: list[dict] = []
        for w in range(self.writers):
            out.extend(self._read_finished(w, ok, limit))
        if self.writers > 1:
            out.sort(key=lambda r: -r["t"])
        return out[:limit]

    def _read_finished(self, writer: int, ok: bool, limit: int) -> list[dict]:
        ring = (self.ok if ok else self.failed)[writer]
        hdr = self.finished_hdr[writer]
        head_i = 0 if ok else 1
        h1 = int(hdr[head_i])
        n = min(limit, h1, FINISHED_RING)
        idx = [(h1 - 1 - k) % FINISHED_RING for k in range(n)]
        rows = ring[idx].copy() if idx else ring[:0].copy()
        h2 = int(hdr[head_i])
        # records overwritten while we copied: the oldest (h2 - h1) ones
        keep = max(0, n - max(0, h2 - h1))
        out = []
        for r in rows[:keep]:
            code = int(r["reason"])
            out.append(
                {
                    "t": float(r["t"]),
                    "name": _s(r["name"]),
                    "bytes": int(r["nbytes"]),
                    "width": int(r["width"]),
                    "height": int(r["height"]),
                    "reason": ALL_REASONS[code] if 0 <= code < len(ALL_REASONS) else None,
                    "text": _s(r["text"]),
                }
            )
        return out

    def finished_count(self, ok: bool) -> int:
        return int(self.finished_hdr[:, 0 if ok else 1].sum())


class FetcherBoard:
    def __init__(self, board: Board, index: int) -> None:
        self.hdr = board.fetch_hdr[index]
        self.rows = board.transfers[index]
        self.handed = board.handed[index]
        self.seqs = [0] * TRANSFERS_PER_FETCHER  # what each listed row shows (skip re-encoding names)
        self.due = 0.0
        self.hdr[:] = 0  # a restarted fetcher starts a fresh list

    def publish(self, attempts: Iterable[_TransferLike], now: float) -> None:
        """Rewrite the list of transfers in flight (call from the loop; cheap, rate-limited)."""
        if now < self.due:
            return
        self.due = now + PUBLISH_EVERY_S
        rows = self.rows
        nb: list[int] = []
        tot: list[int] = []
        hdr = self.hdr
        hdr[0] += 1  # odd: being written
        for k, a in enumerate(attempts):
            if k >= TRANSFERS_PER_FETCHER:
                break
            seq = a.job.seq
            if self.seqs[k] != seq:
                self.seqs[k] = seq
                rows[k] = (seq, a.nbytes, a.total, a.t_start, name_of_url(a.job.url))
            nb.append(a.nbytes)
            tot.append(a.total)
        n = len(nb)
        if n:
            rows["nbytes"][:n] = nb
            rows["total"][:n] = tot
        hdr[1] = n
        hdr[0] += 1

    def handed_on(self, seq: int, url: str) -> None:
        """A body went to the supervisor (and on to a worker): remember its name."""
        h = int(self.hdr[2])
        self.handed[h % HANDED_PER_FETCHER] = (seq, name_of_url(url))
        self.hdr[2] = h + 1


class WorkerBoard:
    def __init__(self, board: Board, index: int) -> None:
        self.rec = board.resizes[index : index + 1]
        self.rec[0] = (0, 0, 0.0)

    def start(self, seq: int, nbytes: int, t0: float) -> None:
        self.rec[0] = (seq, nbytes, t0)

    def idle(self) -> None:
        self.rec["seq"] = 0


class WriterBoard:
    def __init__(self, board: Board, index: int = 0) -> None:
        self.hdr = board.finished_hdr[index]
        self.ok = board.ok[index]
        self.failed = board.failed[index]

    def finished(self, rows: Iterable[_FinishedRow], t: float) -> None:
        """Append committed rows (after the DB commit, so a listed file exists)."""
        hdr = self.hdr
        for r in rows:
            if r.status == "ok":
                # the gallery shows the smallest variant, never the original
                small = min((o for o in r.outputs if o.variant != ORIGINAL), key=lambda o: o.nbytes, default=None)
                path = small.path if small is not None else ""
                text = path.encode() if len(path) <= TEXT_BYTES else b""
                h = int(hdr[0])
                self.ok[h % FINISHED_RING] = (t, r.nbytes or 0, r.width or 0, r.height or 0, -1,
                                              _clip(r.image_id, NAME_BYTES), text)
                hdr[0] = h + 1
            else:
                h = int(hdr[1])
                code = _REASON_CODE.get(r.reason or "", -1)
                self.failed[h % FINISHED_RING] = (t, r.nbytes or 0, 0, 0, code, _clip(r.image_id, NAME_BYTES),
                                                  _clip(r.detail, TEXT_BYTES))
                hdr[1] = h + 1


__all__ = ["Board", "FetcherBoard", "WorkerBoard", "WriterBoard", "board_bytes", "name_of_url"]
