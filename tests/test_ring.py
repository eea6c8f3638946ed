"""The shared-memory slab: bodies spread over slots, and readers that let go of pages."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import CLI, REPO, _ENV as ENV, db_rows, write_list
from engine.ring import Slab

SLOT = 64 * 1024


def _mapped_rss_kib(name: str) -> int:
    """Resident KiB of this process's mapping of the segment ``name`` (from /proc/self/smaps)."""
    rss = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                inside = line.rstrip().endswith("/dev/shm/" + name)
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


def test_body_over_scattered_slots_round_trips() -> None:
    slab = Slab.create(16, SLOT)
    try:
        body = os.urandom(3 * SLOT + 1234)
        slots = [9, 2, 14, 5]  # free lists hand out slots in any order
        for off in range(0, len(body), 16384):  # as libcurl delivers it, in 16 KiB pieces
            slab.write(slots, body[off : off + 16384], off)
        assert slab.read(slots, len(body)) == body
        assert b"".join(slab.chunks(slots, len(body))) == body
        scattered = slab.body(slots, len(body))
        assert isinstance(scattered, bytes) and scattered == body
        in_order = [3, 4, 5, 6, 11]  # the last slot is beyond the body: only the first four count
        for off in range(0, len(body), 16384):
            slab.write(in_order, body[off : off + 16384], off)
        view = slab.body(in_order, len(body))
        assert isinstance(view, memoryview) and view == body  # read in place, no copy
        del view  # a live view would keep the segment from closing
    finally:
        slab.close()


def test_forget_drops_the_readers_pages_not_the_bytes() -> None:
    owner = Slab.create(64, SLOT)
    reader = Slab.attach(owner.name, SLOT)
    try:
        body = os.urandom(40 * SLOT)
        slots = list(range(40))
        owner.write(slots, body)
        assert reader.read(slots, len(body)) == body  # faults the pages into the reader
        before = _mapped_rss_kib(owner.name)
        reader.forget(slots, len(body))
        after = _mapped_rss_kib(owner.name)
        # Both mappings are in this process: the owner's 2.5 MiB stay, the reader's go.
        assert before - after >= 0.9 * len(body) // 1024, (before, after)
        assert reader.read(slots, len(body)) == body  # the segment still holds every byte
        assert owner.read(slots, len(body)) == body
    finally:
        reader.close()
        owner.close()


def test_release_gives_free_slots_memory_back_to_the_system() -> None:
    """What the fetcher does when its transfer target, and so its usable ring, shrinks."""
    slab = Slab.create(64, SLOT)
    try:
        body = os.urandom(SLOT)
        for s in range(48):
            slab.write([s], body)
        allocated = os.stat(f"/dev/shm/{slab.name}").st_blocks * 512
        assert allocated >= 48 * SLOT
        # scattered and contiguous slots: one madvise per run of neighbours
        assert slab.release([3, 1, 2, 10, *range(20, 40)]) == 3
        after = os.stat(f"/dev/shm/{slab.name}").st_blocks * 512
        assert allocated - after >= 24 * SLOT, (allocated, after)
        assert slab.read([0], SLOT) == body and slab.read([47], SLOT) == body  # the others are intact
        assert slab.read([20], 16) == bytes(16)  # a released slot reads as zeros, and is reusable
        slab.write([20], body)
        assert slab.read([20], SLOT) == body
    finally:
        slab.close()


def test_rings_fit_what_dev_shm_holds() -> None:
    from engine.ring import RingConfig, ShmTooSmall, fit_to_shm

    rc = RingConfig()  # 768 MiB per fetcher, 64 MiB per worker
    mib = 1 << 20
    assert fit_to_shm(rc, 1, 2, 24 << 30, 100 * mib) == rc, "room enough: unchanged"
    small = fit_to_shm(rc, 2, 2, 600 * mib, 100 * mib)
    assert small.worker_slots == rc.worker_slots and small.slot_bytes == rc.slot_bytes
    total = (2 * small.fetch_slots + 2 * small.worker_slots) * small.slot_bytes
    assert 0.85 * 600 * mib <= total <= 0.9 * 600 * mib, total / mib
    with pytest.raises(ShmTooSmall, match="--shm-size"):
        fit_to_shm(rc, 1, 2, 64 * mib, 100 * mib)  # Docker's default /dev/shm


def _in_small_shm(size_mib: int, args: list) -> subprocess.CompletedProcess:
    """The CLI in a mount namespace of its own whose /dev/shm is a tmpfs of ``size_mib``."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here (unshare -m: {probe.stderr.decode().strip()})")
    script = f'mount -t tmpfs -o size={size_mib}m tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *CLI, *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=ENV)


def test_a_small_dev_shm_caps_the_rings_or_stops_the_run_clearly(tmp_path, corpus, server) -> None:
    _, items = corpus
    good = [i for i in items if not i.broken][:20]
    lst = write_list(tmp_path / "images.csv", good, server.base_url)
    args = ["run", lst, "--sizes", "64", "--procs", "2", "--ui", "plain"]
    # Docker's default 64 MiB: not even two bodies of --max-bytes and the workers' rings
    p = _in_small_shm(64, [*args, "--out", tmp_path / "a"])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "/dev/shm has 64 MiB free" in p.stderr and "--shm-size" in p.stderr, p.stderr[-2000:]
    # 400 MiB: the fetcher's ring is capped to fit, and the run completes
    p = _in_small_shm(400, [*args, "--out", tmp_path / "b"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "the fetchers' rings are capped at" in p.stderr, p.stderr[-2000:]
    rows = db_rows(tmp_path / "b" / "oidl.sqlite")
    assert len(rows) == len(good) and all(v == ("ok", None) for v in rows.values())
