"""`oidl-engine metadata`: table, resumable verified downloads, safe extraction, the CLI."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import socket
import tarfile
import time
from pathlib import Path

import pytest

from engine import metadata
from engine.errors import Reason
from engine.metadata import RELEASES, DownloadConfig, MetadataError, download, extract, is_complete

SAMPLES = Path("/work/shared/openimages-samples")
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
    # The shared sample is the genuine classes_2017_11.tar.gz: it checks the table's figures.
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
    args = _cli("--release", "v3", "--only", "classes", "--dir", str(tmp_path), "--base-url", _closed_port_url())
    assert metadata.run(args) == 0
    out = capsys.readouterr().out
    assert "present  2017_11/classes_2017_11.tar.gz" in out and "size (table), md5 (table)" in out
    assert "extracted 2017_11/classes_2017_11.tar.gz: 5 files" in out
    assert (tmp_path / "2017_11/class-descriptions.csv").stat().st_size == 475_747
    # Second run: the MD5 comes from the cache sidecar and the extraction marker says done.
    assert metadata.run(args) == 0
    out = capsys.readouterr().out
    assert "present" in out and "extracted" not in out


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
