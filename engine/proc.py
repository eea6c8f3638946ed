"""Process plumbing shared by every child: die with the supervisor, leave signals to it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from .ring import Slab
from .stats import Role, Stats, StatsLayout

_PR_SET_PDEATHSIG = 1


def child_init(name: str) -> None:
    """Call first thing in every child process.

    - The kernel SIGKILLs us when the supervisor dies, even by SIGKILL: no orphans, and the
      resource tracker can then unlink the shared segments.
    - Ctrl-C reaches the whole process group; only the supervisor decides what it means
      (graceful drain first), so children ignore SIGINT. SIGTERM keeps its default.
    """
    ppid = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid or ppid == 1:  # the parent died before prctl took effect
        sys.exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open("/proc/self/comm", "w") as f:  # shows up in ps/top as e.g. oidl-fetcher-0
            f.write(f"oidl-{name}"[:15])
    except OSError:
        pass


@contextmanager
def pipeline_child(
    name: str, slab_name: str, slot_bytes: int, layout: StatsLayout, role: Role, index: int = 0
) -> Iterator[tuple[Slab, Stats]]:
    """A fetcher, worker or writer process: child_init, then its view of the slab and its stats row."""
    child_init(name)
    slab = Slab.attach(slab_name, slot_bytes)
    stats = Stats.attach(layout, role, index)
    try:
        yield slab, stats
    finally:
        stats.close()
        slab.close()
