"""Live statistics in shared memory: written by every process, read by the exporter and UIs.

Layout: one int64 matrix ``[process_row, field]`` in a shared segment. Each process writes
only its own row, so increments need no lock (a single writer per cell); readers sum the
rows. That makes a counter increment a numpy scalar add (~100 ns) — negligible next to a
download or a resize — and the readers never sit in the data path.

Every field is declared once in :data:`FIELDS`; the Prometheus names and help texts that
expose them live in :mod:`engine.metrics`.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from .board import board_bytes
from .errors import ALL_REASONS
from .ring import close_segment, new_segment


class F(enum.IntEnum):
    """Per-process fields (counters only grow; gauges are set)."""

    IMAGES_OK = 0  # counter: rows finished ok (writer)
    IMAGES_FAILED = 1  # counter: rows finished failed (writer)
    DOWNLOADED_BYTES = 2  # counter: body bytes received (fetchers)
    WRITTEN_BYTES = 3  # counter: bytes written to files (writer)
    RETRIES = 4  # counter: transfer attempts re-queued after a transient failure
    TRANSFERS_DONE = 5  # counter: transfers completed (any outcome)
    IMAGES_PROCESSED = 6  # counter: images decoded by workers
    FILES_WRITTEN = 7  # counter
    SKIPPED = 8  # counter: rows already finished in the state DB (resume)
    DOWNLOADS_IN_PROGRESS = 9  # gauge
    RESIZES_IN_PROGRESS = 10  # gauge
    PARKED = 11  # gauge: rows waiting for a retry or a host slot
    FREE_SLOTS = 12  # gauge: free ring slots owned by this process
    OWNED_SLOTS = 13  # gauge: ring slots owned by this process (a fetcher: the part its transfer target uses)
    EXPECTED = 14  # gauge (supervisor): rows in the run's lists, -1 while counting
    QUEUED_BODIES = 15  # gauge (supervisor): bodies waiting for a worker
    QUEUED_WRITES = 16  # gauge (supervisor): records waiting for the writer
    PID = 17  # the process id owning this row (0 = unused)
    HEARTBEAT_MS = 18  # monotonic ms of the last loop iteration (liveness)
    TRANSFERS_TARGET = 19  # gauge (fetchers): transfers the fetcher now keeps in flight (engine.autotune)


N_FIXED = len(F)
#: failure counters by reason follow the fixed fields, in taxonomy order
REASON_BASE = N_FIXED
#: histogram buckets (seconds) for download and processing time
HIST_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# each histogram: len(buckets)+1 bucket counts (last = +Inf), then sum in microseconds
_HIST_LEN = len(HIST_BUCKETS_S) + 2
HIST_DOWNLOAD_BASE = REASON_BASE + len(ALL_REASONS)
HIST_PROCESS_BASE = HIST_DOWNLOAD_BASE + _HIST_LEN
N_FIELDS = HIST_PROCESS_BASE + _HIST_LEN
_PROCESS_SUM_US = HIST_PROCESS_BASE + len(HIST_BUCKETS_S) + 1
_REASON_INDEX = {r: i for i, r in enumerate(ALL_REASONS)}


class Role(str, enum.Enum):
    SUPERVISOR = "supervisor"
    WRITER = "writer"
    FETCHER = "fetcher"
    WORKER = "worker"


@dataclass(frozen=True)
class StatsLayout:
    """Which row belongs to which process; passed to children by value.

    With several routing cells (engine.cells) each cell has a supervisor row and a writer
    row; fetcher and worker rows are numbered across the whole run. Rows: the cells'
    supervisors, then their writers, then every fetcher, then every worker. With one cell
    this is the single-supervisor layout: 0 supervisor, 1 writer, fetchers, workers.
    """

    name: str
    fetchers: int
    workers: int
    cells: int = 1

    @property
    def rows(self) -> int:
        return 2 * self.cells + self.fetchers + self.workers

    @property
    def supervisor_rows(self) -> range:
        return range(self.cells)

    def row(self, role: Role, index: int = 0) -> int:
        if role is Role.SUPERVISOR:
            return index
        if role is Role.WRITER:
            return self.cells + index
        if role is Role.FETCHER:
            return 2 * self.cells + index
        return 2 * self.cells + self.fetchers + index

    def role_of(self, row: int) -> tuple[Role, int]:
        c = self.cells
        if row < c:
            return Role.SUPERVISOR, row
        if row < 2 * c:
            return Role.WRITER, row - c
        if row < 2 * c + self.fetchers:
            return Role.FETCHER, row - 2 * c
        return Role.WORKER, row - 2 * c - self.fetchers


class Stats:
    """A view of the stats matrix; ``row`` is this process's row (None for readers)."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: StatsLayout, row: int | None, owner: bool):
        self._shm = shm
        self.layout = layout
        self.owner = owner
        self.m = np.ndarray((layout.rows, N_FIELDS), dtype=np.int64, buffer=shm.buf)
        self.row = row
        self._r = self.m[row] if row is not None else None

    @classmethod
    def create(cls, fetchers: int, workers: int, cells: int = 1) -> "Stats":
        rows = StatsLayout("", fetchers, workers, cells).rows
        # the board (engine.board: named in-flight items, recent rows) follows the matrix
        shm = new_segment(rows * N_FIELDS * 8 + board_bytes(fetchers, workers, cells))
        layout = StatsLayout(name=shm.name, fetchers=fetchers, workers=workers, cells=cells)
        s = cls(shm, layout, row=0, owner=True)
        s.m[:] = blank(layout)
        return s

    @classmethod
    def attach(cls, layout: StatsLayout, role: Role | None, index: int = 0) -> "Stats":
        shm = shared_memory.SharedMemory(name=layout.name)  # see ring.Slab.attach
        row = layout.row(role, index) if role is not None else None
        s = cls(shm, layout, row=row, owner=False)
        if s._r is not None:
            # A restarted process takes over its predecessor's row: keep the counters
            # (they are totals for the run), reset the gauges it owned.
            for g in (F.DOWNLOADS_IN_PROGRESS, F.RESIZES_IN_PROGRESS, F.PARKED, F.FREE_SLOTS, F.TRANSFERS_TARGET):
                s._r[g] = 0
            s._r[F.PID] = os.getpid()
        return s

    # -- writers (own row only) ---------------------------------------------------------
    def add(self, field: int, n: int = 1) -> None:
        self._r[field] += n  # type: ignore[index]

    def set(self, field: int, value: int) -> None:
        self._r[field] = value  # type: ignore[index]

    def failed(self, reason: str) -> None:
        self._r[REASON_BASE + _REASON_INDEX[reason]] += 1  # type: ignore[index]

    def observe(self, base: int, seconds: float) -> None:
        r = self._r
        i = 0
        for i, b in enumerate(HIST_BUCKETS_S):  # noqa: B007 - i is used after the loop
            if seconds <= b:
                break
        else:
            i = len(HIST_BUCKETS_S)
        r[base + i] += 1  # type: ignore[index]
        r[base + len(HIST_BUCKETS_S) + 1] += int(seconds * 1e6)  # type: ignore[index]

    # -- readers ------------------------------------------------------------------------
    def total(self, field: int) -> int:
        return int(self.m[:, field].sum())

    def supervisors_total(self, field: int) -> int:
        """A supervisor gauge (queues) summed over the cells."""
        return int(self.m[: self.layout.cells, field].sum())

    def workers_processing(self) -> tuple[int, float]:
        """Images processed and processing seconds, summed over the workers (run totals)."""
        rows = self.m[2 * self.layout.cells + self.layout.fetchers :]
        return int(rows[:, F.IMAGES_PROCESSED].sum()), float(rows[:, _PROCESS_SUM_US].sum()) / 1e6

    @property
    def buf(self) -> memoryview:
        return self._shm.buf

    @property
    def board_offset(self) -> int:
        return self.layout.rows * N_FIELDS * 8

    def snapshot(self) -> np.ndarray:
        return self.m.copy()

    def close(self) -> None:
        self._r = None
        self.m = None  # type: ignore[assignment]  (numpy views must go before the mapping)
        close_segment(self._shm, self.owner)


def reason_field(reason: str) -> int:
    """The column of a failure reason's counter (for a process that fills several rows)."""
    return REASON_BASE + _REASON_INDEX[reason]


def blank(layout: StatsLayout) -> np.ndarray:
    """The matrix of a run before anything has happened: zeros, the row total still being counted."""
    m = np.zeros((layout.rows, N_FIELDS), dtype=np.int64)
    m[0, F.EXPECTED] = -1
    return m


def reason_counts(snapshot: np.ndarray) -> dict[str, int]:
    totals = snapshot[:, REASON_BASE : REASON_BASE + len(ALL_REASONS)].sum(axis=0)
    return {r: int(totals[i]) for i, r in enumerate(ALL_REASONS)}


def histogram(snapshot: np.ndarray, base: int) -> tuple[list[int], float]:
    """Cumulative bucket counts (incl. +Inf) and the sum in seconds, summed over rows."""
    cols = snapshot[:, base : base + len(HIST_BUCKETS_S) + 2].sum(axis=0)
    counts = cols[: len(HIST_BUCKETS_S) + 1]
    cumulative = np.cumsum(counts).tolist()
    return [int(c) for c in cumulative], float(cols[-1]) / 1e6
