"""`oidl-engine metadata`: table, resumable verified downloads, safe extraction, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import random
import re
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.meta import download as metadata
from engine.errors import Reason
from engine.loopback import LoopbackServer
from engine.meta.download import RELEASES, DownloadConfig, MetadataError, download, extract, is_complete

#: real Open Images V3 (2017_11) files kept in the repository (see tests/data/README.md)
SAMPLES = Path(__file__).resolve().parent / "data"
FAST = DownloadConfig(
    connect_timeout_s=2, low_speed_time_s=2, low_speed_limit_bps=1000, max_retries=3, retry_base_s=0.05, retry_max_s=0.5
)


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="oidl-engine")
    metadata.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["metadata", *argv])


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_500_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _closed_port_url() -> str:
    """A loopback URL nobody listens on: any request to it fails to connect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# -- the table ----------------------------------------------------------------------------


def test_table_is_well_formed() -> None:
    assert set(RELEASES) == {f"v{i}" for i in range(1, 8)}
    for release, files in RELEASES.items():
        paths = [f.relpath for f in files]
        assert len(paths) == len(set(paths)), release
        for f in files:
            # relpath doubles as a local path under --dir: it must stay inside it.
            assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_./-]*", f.relpath) and ".." not in f.relpath, f
            assert f.size is None or f.size > 0
            assert f.md5_hex is None or re.fullmatch(r"[0-9a-f]{32}", f.md5_hex)
            assert f.extract == f.relpath.endswith(".tar.gz")
    # V1-V3 archives all have published sizes and MD5s.
    for release in ("v1", "v2", "v3"):
        assert all(f.size and f.md5_hex and f.extract for f in RELEASES[release])


def test_table_entry_matches_the_real_v3_classes_archive() -> None:
    # The sample is the genuine classes_2017_11.tar.gz: it checks the table's figures.
    (entry,) = [f for f in RELEASES["v3"] if "classes" in f.relpath]
    data = (SAMPLES / "test_classes_2017_11.tar.gz").read_bytes()
    assert (len(data), hashlib.md5(data).hexdigest()) == (entry.size, entry.md5_hex)


def test_list_prints_sizes_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    assert metadata.run(_cli("--release", "v3", "--list")) == 0
    out = capsys.readouterr().out
    assert "2017_11/images_2017_11.tar.gz" in out and "1,038,133,015" in out
    assert "d840296342470becab9db7228bda86cc" in out
    assert "v3: 5 files" in out


def test_only_filters_and_reports_no_match(capsys: pytest.CaptureFixture[str]) -> None:
    assert metadata.run(_cli("--release", "v4", "--only", "bbox", "--only", "class-desc", "--list")) == 0
    listed = [line.split()[-1] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert listed and all("bbox" in p or "class-desc" in p for p in listed)
    assert metadata.run(_cli("--release", "v4", "--only", "nothing-like-this", "--list")) == 2
    assert "matches no file" in capsys.readouterr().err


def test_unknown_release_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli("--release", "v9", "--dir", "x")
    assert exc.value.code == 2
    assert "invalid choice: 'v9'" in capsys.readouterr().err


def test_unwritable_dir_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = metadata.run(_cli("--release", "v3", "--dir", str(blocker / "sub"), "--base-url", _closed_port_url()))
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: cannot write to") and "Traceback" not in err


def test_non_http_base_url_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert metadata.run(_cli("--release", "v3", "--dir", str(tmp_path), "--base-url", "file:///etc/")) == 2
    assert "--base-url must be http" in capsys.readouterr().err


# -- downloads without a server -----------------------------------------------------------


def test_connect_failure_is_retried_then_fails_cleanly(tmp_path: Path) -> None:
    dest = tmp_path / "a.csv"
    t0 = time.monotonic()
    with pytest.raises(MetadataError) as exc:
        download(_closed_port_url() + "a.csv", dest, size=None, md5_hex=None, cfg=FAST)
    assert exc.value.reason is Reason.CONNECT
    assert "after 3 retries" in str(exc.value)
    assert time.monotonic() - t0 < 10
    assert not dest.exists() and not (tmp_path / "a.csv.part").exists()


def test_complete_file_is_skipped_without_any_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The real archive already in place: a rerun verifies it once, caches that, and never connects
    # (the base URL points at a port nobody listens on, so a request would fail the run).
    entry = [f for f in RELEASES["v3"] if "classes" in f.relpath][0]
    dest = tmp_path / entry.relpath
    dest.parent.mkdir(parents=True)
    dest.write_bytes((SAMPLES / "test_classes_2017_11.tar.gz").read_bytes())
    args = _cli(
        "--release", "v3", "--only", "classes", "--dir", str(tmp_path), "--base-url", _closed_port_url(), "--max-retries", "0"
    )
    assert metadata.run(args) == 0
    out = capsys.readouterr().out
    assert "present  2017_11/classes_2017_11.tar.gz" in out and "size (table), md5 (table)" in out
    assert "extracted 2017_11/classes_2017_11.tar.gz: 5 files" in out
    assert (tmp_path / "2017_11/class-descriptions.csv").stat().st_size == 475_747
    # Second run: the MD5 comes from the cache sidecar and the extraction marker says done.
    assert metadata.run(args) == 0
    out = capsys.readouterr().out
    assert "present" in out and "extracted 2017_11" not in out
    # The user deletes the 300 KB (or 1 GB) archive after extraction: still nothing to fetch.
    dest.unlink()
    assert metadata.run(args) == 0
    assert "[extracted earlier; the archive was removed]" in capsys.readouterr().out
    # ...unless an extracted file went missing too: then the archive is needed (and unreachable).
    (tmp_path / "2017_11/classes.txt").unlink()
    assert metadata.run(args) == 1
    assert "connect" in capsys.readouterr().err


def test_verification_cache_is_keyed_by_size_and_mtime(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"x" * 1000)
    md5 = hashlib.md5(b"x" * 1000).hexdigest()
    assert is_complete(dest, size=1000, md5_hex=md5) is not None
    cache = dest.with_name("f.bin.oidl-verified")
    assert cache.exists()
    # Same size, new content and mtime: the cache no longer applies and the new bytes fail.
    dest.write_bytes(b"y" * 1000)
    os.utime(dest, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert is_complete(dest, size=1000, md5_hex=md5) is None
    assert is_complete(dest, size=999, md5_hex=None) is None


# -- extraction ---------------------------------------------------------------------------


def test_extract_keeps_release_layout_and_marks_done(tmp_path: Path) -> None:
    archive = tmp_path / "2017_11" / "images_2017_11.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(
        _targz({"2017_11/train/images.csv": b"ImageID\n1\n", "2017_11/validation/images.csv": b"ImageID\n2\n"})
    )
    assert extract(archive, tmp_path) == 2
    assert (tmp_path / "2017_11/train/images.csv").read_bytes() == b"ImageID\n1\n"
    assert (tmp_path / "2017_11/validation/images.csv").read_bytes() == b"ImageID\n2\n"
    assert not list(tmp_path.glob(".oidl-extract-*"))
    assert extract(archive, tmp_path) == -1  # marker: skipped
    (tmp_path / "2017_11/train/images.csv").unlink()
    assert extract(archive, tmp_path) == 2  # a file went missing: extracted again


def _evil_archives() -> dict[str, bytes]:
    def with_member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            ok = tarfile.TarInfo("2017_11/ok.csv")
            ok.size = 3
            tf.addfile(ok, io.BytesIO(b"ok\n"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    sym = tarfile.TarInfo("2017_11/link")
    sym.type, sym.linkname = tarfile.SYMTYPE, "classes.txt"  # even a link inside the tree
    dev = tarfile.TarInfo("2017_11/dev")
    dev.type = tarfile.CHRTYPE
    return {
        "dotdot": with_member(tarfile.TarInfo("../evil"), b"pwned"),
        "nested-dotdot": with_member(tarfile.TarInfo("2017_11/../../evil"), b"pwned"),
        "absolute": with_member(tarfile.TarInfo("/tmp/oidl-evil-absolute"), b"pwned"),
        "symlink": with_member(sym),
        "device": with_member(dev),
    }


@pytest.mark.parametrize("kind", sorted(_evil_archives()))
def test_extract_rejects_unsafe_members(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "evil.tar.gz"
    archive.write_bytes(_evil_archives()[kind])
    with pytest.raises(MetadataError, match="unsafe member"):
        extract(archive, root)
    # Nothing escaped, nothing half-extracted (not even the good member), no marker.
    assert sorted(p.name for p in root.iterdir()) == ["evil.tar.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert not Path("/tmp/oidl-evil-absolute").exists()


def test_truncated_archive_is_a_clear_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_targz({"2017_11/x.csv": os.urandom(20000)})[:-200])
    with pytest.raises(MetadataError, match="cannot extract"):
        extract(archive, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz"]


# -- against the loopback server ------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    # One server for the module: starting and stopping one costs about a second.
    with LoopbackServer(tmp_path_factory.mktemp("served")) as server:
        yield server


@dataclasses.dataclass
class Site:
    """This test's own directory on the shared server (its counters are reset for it)."""

    server: LoopbackServer
    root: Path
    prefix: str

    def put(self, relpath: str, data: bytes) -> tuple[int, str]:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return len(data), hashlib.md5(data).hexdigest()

    def url(self, relpath: str, **params: object) -> str:
        return self.server.url(f"{self.prefix}/{relpath}", **params)

    @property
    def base_url(self) -> str:
        return f"{self.server.base_url}/{self.prefix}/"

    def ranges(self, relpath: str) -> list[str]:
        return self.server.stats()["ranges"].get(f"/{self.prefix}/{relpath}", [])

    def requests(self) -> int:
        return sum(self.server.stats()["requests"].values())


@pytest.fixture
def site(loopback: LoopbackServer, request: pytest.FixtureRequest) -> Site:
    prefix = re.sub(r"\W+", "_", request.node.name)
    root = loopback.root / prefix
    root.mkdir()
    loopback.reset_stats()
    return Site(loopback, root, prefix)


def _csv_archive(seed: int) -> bytes:
    # Hex text compresses about 2:1, so the archive is a few hundred KB: big enough to cut mid-body.
    rng = random.Random(seed)
    rows = "".join(f"{rng.getrandbits(64):016x},train\n" for _ in range(12_000))
    return _targz({"2017_11/train/images.csv": ("ImageID,Subset\n" + rows).encode(), "2017_11/classes.txt": b"/m/01\n"})


NO_RETRY = dataclasses.replace(FAST, max_retries=0)


def test_interrupted_download_resumes_with_range_verifies_and_extracts(site: Site, tmp_path: Path) -> None:
    size, md5 = site.put("2017_11/meta.tar.gz", _csv_archive(1))
    cut = size // 3
    dest = tmp_path / "2017_11/meta.tar.gz"
    url = site.url("2017_11/meta.tar.gz", cut=cut)
    # Run 1 dies mid-body (no retries allowed): the bytes so far and their validators stay.
    with pytest.raises(MetadataError) as exc:
        download(url, dest, size=size, md5_hex=md5, cfg=NO_RETRY)
    assert exc.value.reason is Reason.TRUNCATED
    assert not dest.exists()
    assert (tmp_path / "2017_11/meta.tar.gz.part").stat().st_size == cut
    # Run 2 asks only for the rest and verifies the whole (MD5 over the resumed prefix too).
    result = download(url, dest, size=size, md5_hex=md5, cfg=FAST)
    assert site.ranges("2017_11/meta.tar.gz") == [f"bytes={cut}-"]
    assert result.checks == ("size (table)", "md5 (table)")
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5
    assert sorted(p.name for p in dest.parent.iterdir()) == ["meta.tar.gz", "meta.tar.gz.oidl-verified"]
    assert extract(dest, tmp_path) == 2
    assert (tmp_path / "2017_11/train/images.csv").read_bytes().startswith(b"ImageID,Subset\n")


def test_retry_within_one_run_resumes_with_range(site: Site, tmp_path: Path) -> None:
    size, md5 = site.put("f.tar.gz", _csv_archive(2))
    download(site.url("f.tar.gz", cut=1000), tmp_path / "f.tar.gz", size=size, md5_hex=md5, cfg=FAST)
    assert site.ranges("f.tar.gz") == ["bytes=1000-"]
    assert site.requests() == 2


def test_server_ignoring_range_restarts_cleanly(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size, md5 = site.put("f.tar.gz", _csv_archive(3))
    dest = tmp_path / "f.tar.gz"
    url = site.url("f.tar.gz", cut=size // 2, norange=1)
    with pytest.raises(MetadataError):
        download(url, dest, size=size, md5_hex=md5, cfg=NO_RETRY)
    download(url, dest, size=size, md5_hex=md5, cfg=FAST)
    assert site.ranges("f.tar.gz") == [f"bytes={size // 2}-"]  # asked, got a 200 instead
    assert site.requests() == 2
    assert dest.stat().st_size == size  # the 200 body replaced the prefix, not appended to it
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5
    err = capsys.readouterr().err
    assert "server sent the whole file instead of the rest" in err
    assert "downloading again from byte 0" not in err  # restarted within the same request


def test_file_changed_between_attempts_restarts_from_zero(site: Site, tmp_path: Path) -> None:
    old = _csv_archive(4)
    new = old[: len(old) // 2] + bytes(b ^ 0xFF for b in old[len(old) // 2 :])  # same size, other bytes
    size, _ = site.put("f.tar.gz", old)
    dest = tmp_path / "f.tar.gz"
    url = site.url("f.tar.gz", cut=size // 4)
    with pytest.raises(MetadataError):
        download(url, dest, size=size, md5_hex=None, cfg=NO_RETRY)
    site.put("f.tar.gz", new)
    later = time.time() + 60  # a new Last-Modified and ETag, as an upstream replacement has
    os.utime(site.root / "f.tar.gz", (later, later))
    result = download(url, dest, size=size, md5_hex=None, cfg=FAST)
    # The resume carried If-Range; the server saw the stale validator and sent the new file whole.
    assert site.ranges("f.tar.gz") == [f"bytes={size // 4}-"]
    assert dest.read_bytes() == new
    assert result.checks == ("size (table)",)


def test_changed_etag_in_a_206_restarts_from_zero(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A weak ETag cannot go in If-Range, so the resume uses Last-Modified, which still matches:
    # the server answers 206, but its ETag differs from the one recorded with the prefix. The
    # rest must not be glued onto that prefix.
    size, md5 = site.put("f.csv", b"0123456789" * 1000)
    dest = tmp_path / "f.csv"
    last_modified = email.utils.formatdate((site.root / "f.csv").stat().st_mtime, usegmt=True)
    (tmp_path / "f.csv.part").write_bytes(b"X" * 4000)
    sidecar = {"url": site.url("f.csv"), "etag": 'W/"old"', "last_modified": last_modified, "total": size}
    (tmp_path / "f.csv.part.json").write_text(json.dumps(sidecar))
    download(site.url("f.csv"), dest, size=size, md5_hex=md5, cfg=FAST)
    assert dest.read_bytes() == b"0123456789" * 1000
    assert site.ranges("f.csv") == ["bytes=4000-"]
    assert site.requests() == 2
    assert "file changed on the server (etag differ)" in capsys.readouterr().err


def test_md5_mismatch_fails_clearly_and_leaves_no_file(site: Site, tmp_path: Path) -> None:
    size, md5 = site.put("f.tar.gz", _csv_archive(5))
    dest = tmp_path / "out/f.tar.gz"
    with pytest.raises(MetadataError) as exc:
        download(site.url("f.tar.gz"), dest, size=size, md5_hex="0" * 32, cfg=FAST)
    assert site.requests() == 1  # a verification failure is not retried
    assert exc.value.reason is Reason.MD5_MISMATCH
    assert f"MD5 {md5}, expected {'0' * 32}" in str(exc.value)
    assert list(dest.parent.iterdir()) == []


def test_md5_mismatch_after_resume_retries_once_from_zero(site: Site, tmp_path: Path) -> None:
    # A prefix from an earlier run that no validator exposes (same ETag) but is wrong: the
    # resumed whole fails the MD5, so one clean download from byte 0 settles it.
    size, md5 = site.put("f.csv", b"0123456789" * 1000)
    dest = tmp_path / "f.csv"
    etag = f'"{size:x}-{(site.root / "f.csv").stat().st_mtime_ns:x}"'  # the server's current ETag
    (tmp_path / "f.csv.part").write_bytes(b"X" * 4000)
    (tmp_path / "f.csv.part.json").write_text(json.dumps({"url": site.url("f.csv"), "etag": etag, "total": size}))
    download(site.url("f.csv"), dest, size=size, md5_hex=md5, cfg=FAST)
    assert dest.read_bytes() == b"0123456789" * 1000
    assert site.ranges("f.csv") == ["bytes=4000-"]
    assert site.requests() == 2


def test_size_mismatch_is_detected_before_the_body(site: Site, tmp_path: Path) -> None:
    site.put("f.csv", b"x" * 5000)
    with pytest.raises(MetadataError) as exc:
        download(site.url("f.csv"), tmp_path / "f.csv", size=4000, md5_hex=None, cfg=FAST)
    assert exc.value.reason is Reason.SIZE_MISMATCH
    assert "server has 5000 bytes, the table says 4000" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_transient_503_is_retried_and_404_is_not(site: Site, tmp_path: Path) -> None:
    size, md5 = site.put("f.csv", b"ImageID\n" * 100)
    download(site.url("f.csv", fail=2), tmp_path / "a.csv", size=size, md5_hex=md5, cfg=FAST)
    assert site.requests() == 3
    site.server.reset_stats()
    with pytest.raises(MetadataError) as exc:
        download(site.url("f.csv", status=404), tmp_path / "b.csv", size=None, md5_hex=None, cfg=FAST)
    assert exc.value.reason is Reason.HTTP_404
    assert site.requests() == 1


def test_stalled_server_cannot_hang_the_download(site: Site, tmp_path: Path) -> None:
    site.put("f.csv", b"ImageID\n" * 10_000)
    # libcurl averages the speed over a few seconds; a high limit makes the stall show at once.
    cfg = dataclasses.replace(FAST, low_speed_time_s=1, low_speed_limit_bps=100_000, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(MetadataError) as exc:
        download(site.url("f.csv", stall=1), tmp_path / "f.csv", size=None, md5_hex=None, cfg=cfg)
    assert exc.value.reason is Reason.STALLED
    assert time.monotonic() - t0 < 10
    # The retry resumed after what the stalled server had sent; a trickle does not reset the count.
    assert site.ranges("f.csv") == ["bytes=1024-"]


def test_cli_fetches_verifies_extracts_then_skips_without_a_request(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The genuine V3 classes archive under the table's path: the table's size and MD5 apply.
    site.put("2017_11/classes_2017_11.tar.gz", (SAMPLES / "test_classes_2017_11.tar.gz").read_bytes())
    args = _cli("--release", "v3", "--only", "classes", "--dir", str(tmp_path), "--base-url", site.base_url)
    assert metadata.run(args) == 0
    assert site.requests() == 1
    out = capsys.readouterr().out
    assert "fetched  2017_11/classes_2017_11.tar.gz  296.0 KiB  [size (table), md5 (table)]" in out
    assert "extracted 2017_11/classes_2017_11.tar.gz: 5 files" in out
    assert (tmp_path / "2017_11/classes-bbox.txt").stat().st_size == 5779  # as listed in the archive
    site.server.reset_stats()
    assert metadata.run(args) == 0
    assert site.requests() == 0
    out = capsys.readouterr().out
    assert "present  2017_11/classes_2017_11.tar.gz" in out and "extracted" not in out


def test_cli_md5_mismatch_is_one_line_and_nonzero(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Right size, wrong bytes under the table's path: a full download that fails verification.
    real = (SAMPLES / "test_classes_2017_11.tar.gz").read_bytes()
    site.put("2017_11/classes_2017_11.tar.gz", real[:-1] + bytes([real[-1] ^ 1]))
    args = _cli("--release", "v3", "--only", "classes", "--dir", str(tmp_path), "--base-url", site.base_url)
    assert metadata.run(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"^error: 2017_11/classes_2017_11.tar.gz: .*MD5 [0-9a-f]{32}, expected 3937f6dd", err, re.M)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".oidl-metadata.lock", "2017_11"]
    assert list((tmp_path / "2017_11").iterdir()) == []


def test_plain_progress_shows_bytes_rate_and_eta(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without a TTY a line every few seconds: a slow transfer of ~2.5 s shows bytes, rate and ETA.
    site.put("f.csv", b"x" * 60_000)
    progress = metadata._PlainProgress("f.csv", interval_s=0.5)
    download(site.url("f.csv", rate=24_000), tmp_path / "f.csv", size=60_000, md5_hex=None, cfg=FAST, progress=progress)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(re.fullmatch(r"f\.csv: .* / 58\.6 KiB \(.*%\)  .*/s  ETA \d+:\d\d:\d\d", x) for x in lines)
