"""Shared-memory slab of fixed-size slots: how image bytes move between processes.

One ``SharedMemory`` segment of ``slots × slot_bytes`` is created (and unlinked) by the
supervisor only. Every slot index belongs, statically, to exactly one producer process:
fetcher *i* owns a range of slots for downloaded bodies, worker *j* a range for encoded
outputs. A producer fills slots from its own free list (no cross-process lock on the hot
path) and sends the slot indices in a small message; the supervisor gives them back to their
owner once the writer has put the bytes on disk. Because ownership is static and the
supervisor tracks every slot that is downstream, a producer that dies is replaced by one that
starts with exactly the slots that are not in use elsewhere: nothing leaks, nothing is
overwritten while still in use.

A body larger than one slot simply spans several slots (a tuple of indices), so slot size
only sets the granularity, not a maximum. Pages of a slot are touched only when written,
and free lists are stacks (LIFO) so the same few slots stay hot.

Why not a byte ring with head/tail pointers: Python has no atomics or memory barriers for
shared indices; static ownership plus messages needs none, and measured 47,000 200-KB bodies/s
between two processes against ~2,300/s for bodies pickled through a queue.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Iterable, Sequence

SEGMENT_PREFIX = "oidl-"
_SEGMENT_RE = re.compile(r"^oidl-(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class RingConfig:
    slot_bytes: int = 64 * 1024
    #: slots owned by each fetcher for downloaded bodies
    fetch_slots: int = 12288  # 768 MiB of address space per fetcher (a cap); touched only as used
    #: slots owned by each worker for encoded outputs
    worker_slots: int = 1024  # 64 MiB per worker


@dataclass(frozen=True)
class SlotRange:
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot < self.stop

    def indices(self) -> range:
        return range(self.start, self.stop)


class Slab:
    """A shared segment viewed as slots. Create in the supervisor, attach in children."""

    def __init__(self, shm: shared_memory.SharedMemory, slot_bytes: int, owner: bool) -> None:
        self._shm = shm
        self.slot_bytes = slot_bytes
        self.owner = owner
        self.name = shm.name
        self.buf = shm.buf
        self.slots = shm.size // slot_bytes
        # SharedMemory has no public madvise; without it forget() is a no-op (RSS only).
        self._madvise = getattr(getattr(shm, "_mmap", None), "madvise", None)

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> "Slab":
        return cls(new_segment(slots * slot_bytes), slot_bytes, owner=True)

    @classmethod
    def attach(cls, name: str, slot_bytes: int) -> "Slab":
        # Children are spawned by the supervisor's multiprocessing context and share its
        # resource tracker: attaching must not unregister anything, or the supervisor's own
        # unlink trips the tracker. That shared tracker is also what unlinks the segment if
        # the supervisor is SIGKILLed (its children die with it via PDEATHSIG).
        shm = shared_memory.SharedMemory(name=name)
        return cls(shm, slot_bytes, owner=False)

    def view(self, slot: int) -> memoryview:
        off = slot * self.slot_bytes
        return self.buf[off : off + self.slot_bytes]

    def write(self, slots: Sequence[int], data: bytes | memoryview, offset: int = 0) -> None:
        """Write ``data`` at byte ``offset`` of the body spread over ``slots``."""
        sb = self.slot_bytes
        n = len(data)
        i, o = divmod(offset, sb)
        if o + n <= sb:  # the common case (a write callback's chunk inside one slot): one copy
            base = slots[i] * sb + o
            self.buf[base : base + n] = data
            return
        view = memoryview(data)  # slicing bytes would copy every piece once more
        pos = 0
        while pos < n:
            i, o = divmod(offset + pos, sb)
            take = min(sb - o, n - pos)
            base = slots[i] * sb + o
            self.buf[base : base + take] = view[pos : pos + take]
            pos += take

    def read(self, slots: Sequence[int], nbytes: int) -> bytes:
        """Copy a body out (one copy: pyvips wants ``bytes``, and it frees the slots early)."""
        sb = self.slot_bytes
        if len(slots) == 1 or nbytes <= sb:
            off = slots[0] * sb
            return bytes(self.buf[off : off + nbytes])
        parts = []
        left = nbytes
        for s in slots:
            take = min(sb, left)
            off = s * sb
            parts.append(self.buf[off : off + take])
            left -= take
            if left <= 0:
                break
        return b"".join(parts)

    def body(self, slots: Sequence[int], nbytes: int) -> memoryview | bytes:
        """A body to read in place: a view of the slab when its slots are consecutive
        (ascending), so it reaches the decoder without a copy; else one joined copy."""
        first = slots[0]
        need = slots_needed(nbytes, self.slot_bytes)
        if all(slots[i] == first + i for i in range(1, need)):
            off = first * self.slot_bytes
            return self.buf[off : off + nbytes]
        return self.read(slots, nbytes)

    def chunks(self, slots: Sequence[int], nbytes: int) -> Iterable[memoryview]:
        """Zero-copy views of a body, in order (the writer writes them straight to a file)."""
        sb = self.slot_bytes
        left = nbytes
        for s in slots:
            if left <= 0:
                return
            take = min(sb, left)
            off = s * sb
            yield self.buf[off : off + take]
            left -= take

    def forget(self, slots: Sequence[int], nbytes: int) -> None:
        """Unmap a body's pages from this process only; the bytes stay in the segment.

        A reader (worker, writer) touches every body that passes through it, so without this
        each reader's RSS grows to the whole ring and summed RSS counts the ring once per
        process. MADV_DONTNEED on a shared mapping drops our page-table entries, not the data.
        """
        if self._madvise is None:
            return
        sb = self.slot_bytes
        left = nbytes
        for s in slots:
            if left <= 0:
                return
            self._madvise(mmap.MADV_DONTNEED, s * sb, min(sb, left))
            left -= sb

    def release(self, slots: Iterable[int]) -> int:
        """Give free slots' memory back to the system; returns the madvise calls made.

        Unlike forget(), MADV_REMOVE punches the pages out of the segment itself (tmpfs), for
        every process: only for slots nobody holds. The segment is sized for the --ring-mb cap;
        this is how the part the fetcher stops using (engine.autotune) stops costing memory.
        A later write simply faults in zeroed pages again.
        """
        remove = getattr(mmap, "MADV_REMOVE", None)
        if self._madvise is None or remove is None:
            return 0
        sb = self.slot_bytes
        calls = 0
        run_start = run_end = -1
        for s in sorted(slots):
            if s == run_end:
                run_end += 1
                continue
            if run_start >= 0:
                self._madvise(remove, run_start * sb, (run_end - run_start) * sb)
                calls += 1
            run_start, run_end = s, s + 1
        if run_start >= 0:
            self._madvise(remove, run_start * sb, (run_end - run_start) * sb)
            calls += 1
        return calls

    def close(self) -> None:
        self.buf = None  # type: ignore[assignment]
        close_segment(self._shm, self.owner)


#: share of /dev/shm's free space the rings may take: what else uses it may grow
_SHM_SHARE = 0.9


class ShmTooSmall(Exception):
    """/dev/shm cannot hold even the smallest ring this run needs."""


def fit_to_shm(rc: RingConfig, fetchers: int, workers: int, available_bytes: int, min_fetch_bytes: int) -> RingConfig:
    """``rc`` with the fetchers' part shrunk to what ``available_bytes`` of /dev/shm holds.

    The segment is sparse, but every page a body or an output is written to must exist in the
    tmpfs behind /dev/shm: past its size a write is a SIGBUS, not an error. Containers often
    give /dev/shm 64 MiB (Docker's default), so the rings are fitted to its free space (90 %
    of it, what else uses it may grow), the fetchers' caps first since they only bound the
    transfer target. Raises ShmTooSmall when a fetcher would not hold ``min_fetch_bytes``.
    """
    sb = rc.slot_bytes
    worker_bytes = workers * rc.worker_slots * sb
    if fetchers * rc.fetch_slots * sb + worker_bytes <= available_bytes:
        return rc
    fetch_slots = int((_SHM_SHARE * available_bytes - worker_bytes) / fetchers) // sb
    if fetch_slots * sb < min_fetch_bytes:
        need = (fetchers * min_fetch_bytes + worker_bytes) / _SHM_SHARE
        raise ShmTooSmall(
            f"/dev/shm has {available_bytes / 2**20:.0f} MiB free; this run needs at least {need / 2**20:.0f} MiB "
            f"({fetchers} fetcher(s) holding two bodies of --max-bytes each, {workers} worker(s) x "
            f"{rc.worker_slots * sb / 2**20:.0f} MiB). In a container, give it more (docker run --shm-size=2g), "
            "or lower --max-bytes or --procs"
        )
    return RingConfig(slot_bytes=sb, fetch_slots=fetch_slots, worker_slots=rc.worker_slots)


def shm_available_bytes(shm_dir: Path = Path("/dev/shm")) -> int | None:
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def new_segment(size: int) -> shared_memory.SharedMemory:
    """A new segment named after this process, so a later run can tell stale ones apart."""
    name = f"{SEGMENT_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    return shared_memory.SharedMemory(name=name, create=True, size=size)


def close_segment(shm: shared_memory.SharedMemory, owner: bool) -> None:
    """Close our mapping (views must be dropped first) and, for the owner, unlink it."""
    try:
        shm.close()
    except BufferError:  # a view is still exported; the mapping goes with the process
        pass
    if owner:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def slots_needed(nbytes: int, slot_bytes: int) -> int:
    return max(1, -(-nbytes // slot_bytes))


def remove_stale_segments(
    shm_dir: Path = Path("/dev/shm"), keep: Iterable[str] = (), creator: int | None = None
) -> list[str]:
    """Unlink segments left by a supervisor that died without cleaning up (SIGKILL).

    Segment names carry the creating pid; a segment whose creator is gone is ours to remove
    (and one named after this very process is a leftover of an earlier life of the pid,
    unless it is in ``keep``). With ``creator``, only that dead process's segments.
    """
    keep = set(keep)
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _SEGMENT_RE.match(name)
        if not m or name in keep:
            continue
        pid = int(m.group(1))
        if creator is not None and pid != creator:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            os.unlink(shm_dir / name)
            removed.append(name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
