"""``oidl-engine metadata``: fetch a release's image lists, annotations and class files.

Every file comes from a built-in table (:data:`RELEASES`) with its size and MD5 where a public
source gives them. A download goes to ``<dest>.part`` next to a small JSON sidecar holding the
server's validators (ETag, Last-Modified, total size), so an interrupted run resumes with
``Range`` + ``If-Range`` instead of starting a 1 GB archive again. A server that ignores Range,
or a file that changed upstream, restarts the download from zero; a partial prefix is never
glued to a different version of the file. The finished file is verified (size and an MD5
computed while streaming, over the resumed prefix too) and only then renamed to its final name.
``.tar.gz`` archives are extracted into the release's own layout (``2017_11/train/images.csv``)
through a temporary directory, refusing links, devices and paths that escape the target.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pycurl

from engine import __version__
from engine.errors import RETRYABLE, Reason, reason_for_curl, reason_for_status

DEFAULT_BASE_URL = "https://storage.googleapis.com/openimages/"

# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaFile:
    """One file of a release. ``relpath`` is both its path under the base URL and under --dir."""

    relpath: str
    size: int | None  # bytes, None where no source gives it
    md5_hex: str | None  # None where no source gives it
    extract: bool  # a .tar.gz to unpack into --dir


def _f(relpath: str, size: int | None = None, md5_hex: str | None = None) -> MetaFile:
    return MetaFile(relpath, size, md5_hex, extract=relpath.endswith(".tar.gz"))


# V1-V3 sizes and MD5s: dnuffer/open_images_downloader DatasetMetadata.scala (also quoted in
# shared/OPENIMAGES.md). 2018_04 sizes: tensorflow/datasets url_checksums/open_images_v4.txt,
# which gives SHA-256, not MD5, so those MD5s stay unknown. Other paths: openimages download
# pages as quoted by FiftyOne's URL table; their sizes are not published anywhere we checked.
_V1 = (
    _f("2016_08/images_2016_08_v5.tar.gz", 1_038_144_161, "0e47566d03759f0b69cf4a3fba29592c"),
    _f("2016_08/machine_ann_2016_08_v3.tar.gz", 470_893_902, "48a2b164a2998f4da5a78be5655bc1fb"),
    _f("2016_08/human_ann_2016_08_v3.tar.gz", 9_718_729, "ac549b4cc3179309a7b41b81e96c07dc"),
)
_V2 = (
    _f("2017_07/images_2017_07.tar.gz", 1_038_132_176, "9c7d7d1b9c19f72c77ac0fa8e2695e00"),
    _f("2017_07/annotations_human_bbox_2017_07.tar.gz", 38_732_419, "3c57bff20c56e50025e16562c4c0d709"),
    _f("2017_07/annotations_human_2017_07.tar.gz", 69_263_638, "27610fb9d349b728448507beec244e9f"),
    _f("2017_07/annotations_machine_2017_07.tar.gz", 468_937_924, "c19b3fc5059ac13431b085c3e5df08af"),
    _f("2017_07/classes_2017_07.tar.gz", 300_021, "a51205f02faf3867ae2d3e8dc968fd6d"),
)
_V3 = (
    _f("2017_11/images_2017_11.tar.gz", 1_038_133_015, "d840296342470becab9db7228bda86cc"),
    _f("2017_11/annotations_human_bbox_2017_11.tar.gz", 102_011_131, "427faa2f208ab358bed6a7f380a99493"),
    _f("2017_11/annotations_human_2017_11.tar.gz", 144_102_834, "cdcbb5e9aba900530c85cb370564f599"),
    _f("2017_11/annotations_machine_2017_11.tar.gz", 468_938_323, "493e0e17f8bbb1dd1bf778b24aa11a84"),
    _f("2017_11/classes_2017_11.tar.gz", 303_055, "3937f6dddf777ca912c816d5f6ffe06f"),
)
# Image lists of the boxable subset; V5-V7 keep using these (FiftyOne's V6/V7 URL table).
_2018_04_IMAGES = (
    _f("2018_04/train/train-images-boxable-with-rotation.csv"),
    _f("2018_04/validation/validation-images-with-rotation.csv"),
    _f("2018_04/test/test-images-with-rotation.csv"),
)
_V4 = (
    *_2018_04_IMAGES,
    _f("2018_04/image_ids_and_rotation.csv"),
    _f("2018_04/train/train-annotations-bbox.csv", 1_194_033_454),
    _f("2018_04/validation/validation-annotations-bbox.csv", 17_074_036),
    _f("2018_04/test/test-annotations-bbox.csv", 52_174_204),
    _f("2018_04/train/train-annotations-human-imagelabels.csv", 1_229_488_697),
    _f("2018_04/validation/validation-annotations-human-imagelabels.csv", 23_008_122),
    _f("2018_04/test/test-annotations-human-imagelabels.csv", 69_570_530),
    _f("2018_04/train/train-annotations-machine-imagelabels.csv", 3_048_336_194),
    _f("2018_04/validation/validation-annotations-machine-imagelabels.csv", 19_801_709),
    _f("2018_04/test/test-annotations-machine-imagelabels.csv", 59_773_452),
    _f("2018_04/class-descriptions.csv", 475_854),
    _f("2018_04/class-descriptions-boxable.csv"),
    _f("2018_04/bbox_labels_600_hierarchy.json"),
)
_SPLITS = ("train", "validation", "test")
_MASK_SHARDS = "0123456789abcdef"
# V5 segmentations; V6 and V7 still point at these files.
_V5_SEGMENTATION = (
    _f("v5/classes-segmentation.txt"),
    *(_f(f"v5/{s}-annotations-object-segmentation.csv") for s in _SPLITS),
    *(_f(f"v5/{s}-masks/{s}-masks-{h}.zip") for s in _SPLITS for h in _MASK_SHARDS),
)
_V5 = (
    *_2018_04_IMAGES,
    _f("2018_04/train/train-annotations-bbox.csv", 1_194_033_454),
    _f("v5/validation-annotations-bbox.csv"),
    _f("v5/test-annotations-bbox.csv"),
    _f("v5/train-annotations-human-imagelabels.csv"),
    *(_f(f"v5/{s}-annotations-human-imagelabels-boxable.csv") for s in _SPLITS),
    _f("v5/class-descriptions-boxable.csv"),
    _f("2018_04/bbox_labels_600_hierarchy.json"),
    *_V5_SEGMENTATION,
)
_V6_COMMON = (
    *_2018_04_IMAGES,
    _f("v6/oidv6-train-images-with-labels-with-rotation.csv"),
    _f("v6/oidv6-train-annotations-bbox.csv"),
    _f("v5/validation-annotations-bbox.csv"),
    _f("v5/test-annotations-bbox.csv"),
    *(_f(f"v5/{s}-annotations-human-imagelabels-boxable.csv") for s in _SPLITS),
    *(_f(f"v6/oidv6-{s}-annotations-vrd.csv") for s in _SPLITS),
    _f("v6/oidv6-attributes-description.csv"),
    _f("v6/oidv6-relationship-triplets.csv"),
    _f("v6/oidv6-relationships-description.csv"),
    _f("v5/class-descriptions-boxable.csv"),
    _f("2018_04/bbox_labels_600_hierarchy.json"),
    *_V5_SEGMENTATION,
)
_V6 = (
    *_V6_COMMON,
    _f("v6/oidv6-train-annotations-human-imagelabels.csv"),
    _f("v5/validation-annotations-human-imagelabels.csv"),
    _f("v5/test-annotations-human-imagelabels.csv"),
    _f("v6/oidv6-class-descriptions.csv"),
    _f("v6/oidv6-class-descriptions-boxable.csv"),
    _f("v6/oidv6-classes-trainable.txt"),
)
_V7 = (
    *_V6_COMMON,
    *(_f(f"v7/oidv7-{s}-annotations-point-labels.csv") for s in ("train", "val", "test")),
    *(_f(f"v7/oidv7-{s}-annotations-human-imagelabels.csv") for s in ("train", "val", "test")),
    _f("v7/oidv7-train-annotations-machine-imagelabels.csv"),
    _f("v7/oidv7-class-descriptions.csv"),
    _f("v7/oidv7-class-descriptions-boxable.csv"),
    _f("v7/oidv7-classes-trainable.txt"),
)

# Localized Narratives (captions, and with --narratives full also the mouse traces) live under
# their own base URL; they are stored under NARRATIVES_DIR so they never collide with a release file.
DEFAULT_NARRATIVES_URL = "https://storage.googleapis.com/localized-narratives/annotations/"
NARRATIVES_DIR = "localized-narratives"
NARRATIVES: dict[str, tuple[MetaFile, ...]] = {
    "captions": tuple(
        _f(f"{NARRATIVES_DIR}/open_images_{s}_captions.jsonl") for s in ("train_v6", "validation", "test")
    ),
    # about 16 GB for train
    "full": (
        *(_f(f"{NARRATIVES_DIR}/open_images_train_v6_localized_narratives-{i:05d}-of-00010.jsonl") for i in range(10)),
        _f(f"{NARRATIVES_DIR}/open_images_validation_localized_narratives.jsonl"),
        _f(f"{NARRATIVES_DIR}/open_images_test_localized_narratives.jsonl"),
    ),
}

RELEASES: dict[str, tuple[MetaFile, ...]] = {
    "v1": _V1,
    "v2": _V2,
    "v3": _V3,
    "v4": _V4,
    "v5": _V5,
    "v6": _V6,
    "v7": _V7,
}

# ------------------------------------------------------------------------------------------
# Downloading
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadConfig:
    connect_timeout_s: float = 20.0
    # A server that sends less than low_speed_limit_bps for low_speed_time_s is dropped
    # and the transfer resumed: a stalled connection must not hang the run.
    low_speed_time_s: int = 30
    low_speed_limit_bps: int = 1024
    max_retries: int = 10
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    max_redirects: int = 5
    # An attempt that delivered this much before failing resets the retry count, so a long
    # download over a flaky link survives interruptions spread over hours, while a server that
    # trickles a few KB per connection and then stalls still exhausts the retries.
    retry_reset_bytes: int = 8 << 20
    user_agent: str = f"oidl-engine/{__version__} (Open Images metadata; pycurl)"


#: ``progress(bytes_done, bytes_total_or_None)``; called as bytes arrive (and once at start).
ProgressFn = Callable[[int, "int | None"], None]


class MetadataError(Exception):
    """A failure that ends one file; ``str()`` is the one line shown to the user."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Verified:
    """What a finished (or skipped) file was checked against, for the user to see."""

    size_bytes: int
    md5_hex: str | None
    checks: tuple[str, ...]  # e.g. ("size (table)", "md5 (server x-goog-hash)"); () = nothing knowable
    skipped: bool = False


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def _verified_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".oidl-verified")


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _md5_file(path: Path) -> hashlib._Hash:
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def _server_md5_hex(headers: dict[str, str]) -> str | None:
    """MD5 the server publishes for the object: GCS ``x-goog-hash: crc32c=..,md5=..`` or Content-MD5.

    GCS leaves md5 out for composite objects, so its absence is normal.
    """
    candidates = []
    for part in headers.get("x-goog-hash", "").split(","):
        key, _, value = part.strip().partition("=")
        if key == "md5":
            candidates.append(value)
    if "content-md5" in headers:
        candidates.append(headers["content-md5"])
    for b64 in candidates:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 16:
            return raw.hex()
    return None


def is_complete(dest: Path, *, size: int | None, md5_hex: str | None) -> Verified | None:
    """The verification of an already-downloaded ``dest``, or None if it must be (re)fetched.

    The result is cached in a sidecar keyed by size and mtime, so a rerun does not re-hash GBs.
    """
    try:
        st = dest.stat()
    except FileNotFoundError:
        return None
    if size is not None and st.st_size != size:
        return None
    cached = _read_json(_verified_path(dest))
    if cached and cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
        if md5_hex is None or cached.get("md5") == md5_hex:
            return Verified(st.st_size, cached.get("md5"), tuple(cached.get("checks", ())), skipped=True)
    if md5_hex is None:
        # A file we did not verify ourselves (no sidecar) and nothing to check it against:
        # keep it rather than re-download blindly, and say so.
        checks = ("size (table)",) if size is not None else ()
        return Verified(st.st_size, None, checks, skipped=True)
    digest = _md5_file(dest).hexdigest()
    if digest != md5_hex:
        return None
    checks = (*(("size (table)",) if size is not None else ()), "md5 (table)")
    _write_json_atomic(
        _verified_path(dest), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": digest, "checks": checks}
    )
    return Verified(st.st_size, digest, checks, skipped=True)


class _Transfer:
    """One HTTP request appending to the partial file, driven by libcurl's callbacks."""

    def __init__(
        self,
        name: str,
        part: BinaryIO,
        offset: int,
        md5: hashlib._Hash,
        sidecar: dict,
        on_start: Callable[[dict], None],
        progress: ProgressFn | None,
    ) -> None:
        self.name = name
        self.part = part
        self.offset = offset  # bytes on disk when the body started (0 after a restart)
        self.written = offset  # bytes on disk now
        self.md5 = md5
        self.sidecar = sidecar  # validators of the bytes already on disk
        self.on_start = on_start
        self.progress = progress
        self.status = 0
        self.headers: dict[str, str] = {}
        self.started = False  # the body of a 2xx answer has begun
        self.restart_reason = ""  # why the body was refused and the file must start over
        self.total: int | None = None  # whole-file size announced by the server
        # libcurl swallows exceptions raised in callbacks (it reports a write error instead);
        # keep them so Ctrl-C and bugs surface instead of being retried as network errors.
        self.exc: BaseException | None = None

    def on_header(self, line: bytes) -> None:
        text = line.decode("iso-8859-1").strip()
        if text.startswith("HTTP/"):
            # A new response (redirect hop, 100 Continue): forget the previous headers.
            parts = text.split(None, 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = {}
            return
        key, sep, value = text.partition(":")
        if sep:
            self.headers[key.strip().lower()] = value.strip()

    def on_write(self, data: bytes) -> int | None:
        try:
            if not 200 <= self.status < 300:
                return None  # an error page: discard it, the status decides after perform()
            if not self.started and not self._begin_body():
                return 0  # abort with CURLE_WRITE_ERROR; restart_reason tells why
            self.part.write(data)
            self.md5.update(data)
            self.written += len(data)
            if self.progress is not None:
                self.progress(self.written, self.total)
            return None
        except BaseException as e:  # noqa: BLE001 - re-raised after perform()
            self.exc = e
            return 0

    def _begin_body(self) -> bool:
        """At the first body byte of a 2xx answer: append, start over, or refuse the body."""
        self.started = True
        if self.status == 206:
            # Content-Range: bytes START-END/TOTAL
            spec = self.headers.get("content-range", "").partition(" ")[2]
            start, total = spec.partition("-")[0], spec.partition("/")[2]
            self.total = int(total) if total.isdigit() else None
            if start != str(self.offset):
                self.restart_reason = f"unexpected Content-Range {self.headers.get('content-range')!r}"
                return False
        else:
            length = self.headers.get("content-length", "")
            self.total = int(length) if length.isdigit() else None
        validators = {
            "etag": self.headers.get("etag"),
            "last_modified": self.headers.get("last-modified"),
            "total": self.total,
            "server_md5": _server_md5_hex(self.headers),
        }
        if self.offset > 0 and self.status == 200:
            # Range ignored, or If-Range found the file changed: this body is the whole file.
            print(f"note: {self.name}: server sent the whole file instead of the rest; starting over", file=sys.stderr)
            self.truncate()
        elif self.offset > 0:
            # Compared only where both sides know a value: a validator the server never sent
            # proves nothing (the MD5 check after a resume is the safety net there).
            changed = [
                k
                for k in ("etag", "last_modified", "total")
                if None not in (self.sidecar.get(k), validators[k]) and self.sidecar.get(k) != validators[k]
            ]
            if changed:
                # The server did not honour If-Range, yet the file changed under us.
                self.restart_reason = f"file changed on the server ({', '.join(changed)} differ)"
                return False
        # Recorded before the first byte lands, so a killed process leaves validators behind.
        self.on_start(validators)
        return True

    def truncate(self) -> None:
        self.part.seek(0)
        self.part.truncate()
        self.offset = self.written = 0
        self.md5 = hashlib.md5()


def _backoff_s(cfg: DownloadConfig, attempt: int, retry_after: str | None) -> float:
    if retry_after and retry_after.strip().isdigit():
        return min(cfg.retry_max_s, float(retry_after.strip()))
    # Jitter keeps several clients from retrying in lockstep.
    return min(cfg.retry_max_s, cfg.retry_base_s * 2**attempt) * random.uniform(0.5, 1.0)


def _perform(url: str, cfg: DownloadConfig, xfer: _Transfer) -> pycurl.error | None:
    c = pycurl.Curl()
    try:
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, cfg.max_redirects)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(cfg.connect_timeout_s * 1000))
        # No total TIMEOUT: a multi-GB file may take hours; the low-speed limit catches stalls.
        c.setopt(pycurl.LOW_SPEED_LIMIT, cfg.low_speed_limit_bps)
        c.setopt(pycurl.LOW_SPEED_TIME, cfg.low_speed_time_s)
        c.setopt(pycurl.USERAGENT, cfg.user_agent)
        headers = []
        if xfer.offset:
            headers.append(f"Range: bytes={xfer.offset}-")
            # If-Range needs a strong validator; with a weak ETag fall back to Last-Modified.
            etag = xfer.sidecar.get("etag")
            validator = etag if etag and not etag.startswith("W/") else xfer.sidecar.get("last_modified")
            if validator:
                headers.append(f"If-Range: {validator}")
        c.setopt(pycurl.HTTPHEADER, headers)
        c.setopt(pycurl.HEADERFUNCTION, xfer.on_header)
        c.setopt(pycurl.WRITEFUNCTION, xfer.on_write)
        try:
            c.perform()
        except pycurl.error as e:
            return e
        return None
    finally:
        c.close()
        xfer.part.flush()
        if xfer.exc is not None:
            raise xfer.exc


#: Full restarts (server ignored Range, file changed, MD5 wrong after resume) before giving up.
_MAX_RESTARTS = 3


def download(
    url: str,
    dest: Path,
    *,
    size: int | None,
    md5_hex: str | None,
    cfg: DownloadConfig,
    progress: ProgressFn | None = None,
) -> Verified:
    """Download ``url`` to ``dest`` with resume, retries and verification.

    Raises :class:`MetadataError` when the file cannot be fetched or fails verification; then
    nothing exists at ``dest`` (a ``.part`` with its validators may stay for a later resume).
    """
    part_path, side_path = _part_paths(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sidecar = _Sidecar(side_path, url)
    if part_path.exists() and (
        sidecar.data.get("url") != url or (size is not None and part_path.stat().st_size > size)
    ):
        # Bytes without validators, from another URL, or longer than the file: unusable.
        part_path.unlink()
    if not part_path.exists():
        sidecar.clear()
    try:
        digest, checks = _download_part(url, part_path, sidecar, size, md5_hex, cfg, progress)
    except MetadataError:
        # Keep a partial file worth resuming; an emptied one (failed verification) goes.
        if part_path.exists() and part_path.stat().st_size == 0:
            part_path.unlink()
            sidecar.clear()
        raise
    os.replace(part_path, dest)
    sidecar.clear()
    st = dest.stat()
    _write_json_atomic(
        _verified_path(dest), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": digest, "checks": checks}
    )
    return Verified(st.st_size, digest, checks)


class _Sidecar:
    """Validators (ETag, Last-Modified, total size, server MD5) of the bytes in a ``.part``."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        self.data: dict = _read_json(path) or {}

    def record(self, validators: dict) -> None:
        self.data = {"url": self.url, **validators}
        _write_json_atomic(self.path, self.data)

    def clear(self) -> None:
        self.data = {}
        self.path.unlink(missing_ok=True)


def _download_part(
    url: str,
    part_path: Path,
    sidecar: _Sidecar,
    size: int | None,
    md5_hex: str | None,
    cfg: DownloadConfig,
    progress: ProgressFn | None,
) -> tuple[str, tuple[str, ...]]:
    """Fill ``part_path`` until it verifies; return its MD5 and the checks applied."""
    name = part_path.name.removesuffix(".part")
    with part_path.open("a+b") as part:
        offset = part.seek(0, os.SEEK_END)
        md5 = _md5_file(part_path) if offset else hashlib.md5()  # the resumed prefix, read once
        resumed = offset > 0
        attempt = restarts = 0
        while True:
            xfer = _Transfer(name, part, offset, md5, dict(sidecar.data), sidecar.record, progress)
            total = size if size is not None else sidecar.data.get("total")
            if progress is not None:
                progress(offset, total)
            if offset and offset == total:
                # A .part already whole (killed between the last byte and the rename): verify it
                # without a request, which the server would answer 416 anyway.
                err, xfer.status, xfer.total = None, 200, total
            else:
                err = _perform(url, cfg, xfer)
            md5 = xfer.md5
            if xfer.started and xfer.offset == 0:
                resumed = False

            restart = xfer.restart_reason
            if not restart and err is None and xfer.status == 416 and offset:
                restart = "server cannot serve the rest of the partial file (HTTP 416)"
            failure: Reason | None = None
            detail = ""
            if restart:
                pass
            elif err is not None:
                failure, detail = reason_for_curl(err.args[0], err.args[1]), err.args[1]
            elif (status_reason := reason_for_status(xfer.status)) is not None:
                failure, detail = status_reason, f"HTTP {xfer.status}"
            else:
                if size is not None and xfer.total is not None and xfer.total != size:
                    _discard(part, sidecar)
                    raise MetadataError(Reason.SIZE_MISMATCH, f"{url}: server has {xfer.total} bytes, the table says {size}")
                expected = size if size is not None else xfer.total
                if expected is not None and xfer.written < expected:
                    failure, detail = Reason.TRUNCATED, f"got {xfer.written} of {expected} bytes"
                elif expected is not None and xfer.written > expected:
                    _discard(part, sidecar)
                    raise MetadataError(Reason.SIZE_MISMATCH, f"{url}: got {xfer.written} bytes, expected {expected}")
                else:
                    digest = md5.hexdigest()
                    want_md5 = md5_hex or sidecar.data.get("server_md5")
                    if want_md5 is None or digest == want_md5:
                        os.fsync(part.fileno())
                        return digest, _checks(size, expected, md5_hex, want_md5)
                    if not resumed:
                        _discard(part, sidecar)
                        raise MetadataError(Reason.MD5_MISMATCH, f"{url}: MD5 {digest}, expected {want_md5}")
                    # The prefix from an earlier run may be another version of the file that the
                    # validators did not reveal: one clean download settles it.
                    restart = "MD5 mismatch after a resumed download"

            if restart:
                restarts += 1
                if restarts > _MAX_RESTARTS:
                    _discard(part, sidecar)
                    raise MetadataError(Reason.NETWORK, f"{url}: gave up after {_MAX_RESTARTS} restarts ({restart})")
                print(f"note: {name}: {restart}; downloading again from byte 0", file=sys.stderr)
                _discard(part, sidecar)
                md5, offset, resumed = hashlib.md5(), 0, False
                continue

            assert failure is not None
            if failure not in RETRYABLE:
                raise MetadataError(failure, f"{url}: {failure.value} ({detail})")
            if xfer.written - xfer.offset >= cfg.retry_reset_bytes:
                attempt = 0
            if attempt >= cfg.max_retries:
                raise MetadataError(failure, f"{url}: {failure.value} after {cfg.max_retries} retries ({detail})")
            delay = _backoff_s(cfg, attempt, xfer.headers.get("retry-after"))
            attempt += 1
            resume_note = f", resuming at byte {xfer.written}" if xfer.written else ""
            print(
                f"note: {name}: {failure.value} ({detail}); retry {attempt}/{cfg.max_retries} in {delay:.1f} s{resume_note}",
                file=sys.stderr,
            )
            time.sleep(delay)
            offset = xfer.written


def _discard(part: BinaryIO, sidecar: _Sidecar) -> None:
    """Empty the partial file and forget its validators (the .part itself is reused or removed)."""
    part.seek(0)
    part.truncate()
    sidecar.clear()


def _checks(size: int | None, expected: int | None, md5_hex: str | None, want_md5: str | None) -> tuple[str, ...]:
    checks = []
    if size is not None:
        checks.append("size (table)")
    elif expected is not None:
        checks.append("size (server)")
    if md5_hex is not None:
        checks.append("md5 (table)")
    elif want_md5 is not None:
        checks.append("md5 (server)")
    return tuple(checks)


# ------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------


def _extracted_marker(archive: Path) -> Path:
    return archive.with_name(archive.name + ".oidl-extracted")


def _extracted_without_archive(archive: Path, root: Path, size: int | None) -> bool:
    """True if the archive was extracted and then deleted (users reclaim GBs): nothing to fetch."""
    if archive.exists():
        return False
    done = _read_json(_extracted_marker(archive))
    if not done or (size is not None and done.get("size") != size):
        return False
    return all((root / rel).is_file() for rel in done.get("files", ()))


def _only_plain_members(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    # The "data" filter refuses "..", devices and links that leave the target, but it only
    # strips a leading "/"; an absolute name in a metadata archive means a broken or hostile
    # archive, so refuse it, and every link too (these archives hold files and directories).
    if member.name.startswith(("/", os.sep)):
        raise tarfile.AbsolutePathError(member)
    if not (member.isreg() or member.isdir()):
        raise tarfile.SpecialFileError(member)
    return tarfile.data_filter(member, dest_path)


def extract(archive: Path, root: Path) -> int:
    """Extract ``archive`` (.tar.gz) into ``root`` safely; return the number of files.

    Members land in a temporary directory under ``root`` first and are renamed into place
    only when the whole archive was read, so a bad or truncated archive leaves nothing behind.
    A marker next to the archive makes a rerun skip this step.
    """
    marker = _extracted_marker(archive)
    st = archive.stat()
    done = _read_json(marker)
    if done and done.get("size") == st.st_size and done.get("mtime_ns") == st.st_mtime_ns:
        if all((root / rel).is_file() for rel in done.get("files", ())):
            return -1
    tmp = Path(tempfile.mkdtemp(prefix=".oidl-extract-", dir=root))
    try:
        files: list[str] = []
        try:
            # Stream mode: one pass over a GB archive, no seeking back for a member index.
            with tarfile.open(archive, "r|gz") as tf:
                for member in tf:
                    tf.extract(member, tmp, filter=_only_plain_members)
                    if member.isreg():
                        files.append(member.name)
        except tarfile.FilterError as e:
            raise MetadataError(Reason.CORRUPT, f"{archive.name}: unsafe member {e.tarinfo.name!r} rejected ({e})") from None
        except (tarfile.TarError, EOFError, OSError) as e:
            raise MetadataError(Reason.CORRUPT, f"{archive.name}: cannot extract: {e}") from None
        files = sorted(set(files))  # a tar may repeat a name; the last copy won in tmp
        for rel in files:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_json_atomic(marker, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "files": files})
    return len(files)


# ------------------------------------------------------------------------------------------
# Progress display
# ------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class _PlainProgress:
    """Without a TTY: one line every ``interval_s`` (logs stay readable)."""

    name: str
    interval_s: float = 5.0
    _t0: float = 0.0
    _done0: int = 0
    _last: float = 0.0
    _init: bool = field(default=False)

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if not self._init or done < self._done0:  # first call, or the download restarted at 0
            self._t0 = self._last = now
            self._done0 = done
            self._init = True
            return
        if now - self._last < self.interval_s:
            return
        self._last = now
        rate = (done - self._done0) / max(now - self._t0, 1e-9)
        line = f"{self.name}: {_human(done)}"
        if total:
            line += f" / {_human(total)} ({100 * done / total:.1f}%)"
        line += f"  {_human(rate)}/s"
        if total and rate > 0:
            line += f"  ETA {_eta((total - done) / rate)}"
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress_for(name: str, tty: bool) -> Iterator[ProgressFn]:
    if not tty:
        yield _PlainProgress(name)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task: list[int] = []

        def update(done: int, total: int | None) -> None:
            if not task:
                # Created at the first call so a resumed prefix does not count as speed.
                task.append(bar.add_task(name, total=total, completed=done))
            else:
                bar.update(task[0], completed=done, total=total)

        yield update


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


#: the subcommands this module adds to `oidl-engine` (see cli._command_modules)
COMMANDS = ("metadata",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "metadata",
        help="download a release's image lists, annotations and class files",
        description=(
            "Download the image lists, annotations and class files of an Open Images release from a "
            "built-in table of URLs with known sizes and MD5s. Interrupted downloads resume with HTTP "
            "Range; finished files are verified (size, MD5) and .tar.gz archives extracted into the "
            "release's layout under --dir. Files already complete are skipped."
        ),
    )
    p.add_argument("--release", required=True, choices=sorted(RELEASES), help="Open Images release")
    p.add_argument("--dir", type=Path, help="destination directory (required unless --list)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where the files live (default: %(default)s)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="only files whose path contains SUBSTRING (repeatable; any match selects)",
    )
    p.add_argument(
        "--narratives",
        choices=sorted(NARRATIVES),
        help="also fetch the Localized Narratives: 'captions' (about 180 MB) or 'full' (with mouse traces, "
        f"about 17 GB), into DIR/{NARRATIVES_DIR}/",
    )
    p.add_argument(
        "--narratives-base-url",
        default=DEFAULT_NARRATIVES_URL,
        help="where the Localized Narratives live (default: %(default)s)",
    )
    p.add_argument("--no-extract", action="store_true", help="keep .tar.gz archives packed")
    p.add_argument("--list", action="store_true", help="print the release's files with sizes and exit")
    p.add_argument("--max-retries", type=int, default=DownloadConfig.max_retries, help="retries per file (default: %(default)s)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DownloadConfig.connect_timeout_s,
        metavar="SECONDS",
        help="connect timeout (default: %(default)s)",
    )
    p.add_argument(
        "--low-speed-time",
        type=int,
        default=DownloadConfig.low_speed_time_s,
        metavar="SECONDS",
        help=f"drop and resume a transfer slower than {DownloadConfig.low_speed_limit_bps} B/s for this long "
        "(default: %(default)s)",
    )
    p.add_argument("--user-agent", default=DownloadConfig.user_agent, help="User-Agent header")


def _selected(release: str, only: list[str], narratives: str | None = None) -> tuple[MetaFile, ...]:
    files = RELEASES[release] + (NARRATIVES[narratives] if narratives else ())
    if only:
        files = tuple(f for f in files if any(s in f.relpath for s in only))
    return files


def _print_list(release: str, files: tuple[MetaFile, ...]) -> None:
    for f in files:
        size = f"{f.size:>15,}" if f.size is not None else f"{'?':>15}"
        md5 = f.md5_hex or "-" * 32
        print(f"{size}  {md5}  {f.relpath}{'  [extract]' if f.extract else ''}")
    known = sum(f.size for f in files if f.size is not None)
    unknown = sum(1 for f in files if f.size is None)
    print(f"{release}: {len(files)} files, {_human(known)} known" + (f", {unknown} of unknown size" if unknown else ""))


def run(args: argparse.Namespace) -> int:
    release = args.release
    if release not in RELEASES:
        print(f"error: unknown release {release!r} (choose from {', '.join(sorted(RELEASES))})", file=sys.stderr)
        return 2
    narratives = getattr(args, "narratives", None)
    files = _selected(release, list(args.only or ()), narratives)
    if not files:
        print(f"error: --only {args.only} matches no file of {release}", file=sys.stderr)
        return 2
    if args.list:
        _print_list(release, files)
        return 0
    if args.dir is None:
        print("error: --dir is required (unless --list)", file=sys.stderr)
        return 2
    narratives_url = getattr(args, "narratives_base_url", DEFAULT_NARRATIVES_URL)
    for opt, value in (("--base-url", args.base_url), ("--narratives-base-url", narratives_url)):
        if not value.startswith(("http://", "https://")):
            print(f"error: {opt} must be http:// or https://, not {value!r}", file=sys.stderr)
            return 2
    cfg = DownloadConfig(
        connect_timeout_s=args.connect_timeout,
        low_speed_time_s=args.low_speed_time,
        max_retries=args.max_retries,
        user_agent=args.user_agent,
    )
    root: Path = args.dir
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = (root / ".oidl-metadata.lock").open("w")
    except OSError as e:
        print(f"error: cannot write to {root}: {e.strerror or e}", file=sys.stderr)
        return 1
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"error: another 'oidl-engine metadata' is running in {root}", file=sys.stderr)
            return 1
        try:
            urls = {None: args.base_url, NARRATIVES_DIR: narratives_url}
            return _run_locked(files, root, urls, cfg, extract_archives=not args.no_extract)
        except KeyboardInterrupt:
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return 130


def _url_of(f: MetaFile, base_urls: dict[str | None, str]) -> str:
    """A release file lives at its relpath under --base-url; a narratives file under its own URL."""
    top, _, rest = f.relpath.partition("/")
    if top in base_urls:
        return base_urls[top].rstrip("/") + "/" + rest
    return base_urls[None].rstrip("/") + "/" + f.relpath


def _run_locked(
    files: tuple[MetaFile, ...], root: Path, base_urls: str | dict[str | None, str], cfg: DownloadConfig, *, extract_archives: bool
) -> int:
    tty = sys.stderr.isatty()
    failed = 0
    if isinstance(base_urls, str):
        base_urls = {None: base_urls}
    for f in files:
        dest = root / f.relpath
        url = _url_of(f, base_urls)
        try:
            if f.extract and extract_archives and _extracted_without_archive(dest, root, f.size):
                print(f"present  {f.relpath}  [extracted earlier; the archive was removed]", flush=True)
                continue
            result = is_complete(dest, size=f.size, md5_hex=f.md5_hex)
            if result is None:
                with _progress_for(f.relpath, tty) as progress:
                    result = download(url, dest, size=f.size, md5_hex=f.md5_hex, cfg=cfg, progress=progress)
            how = ", ".join(result.checks) if result.checks else "UNVERIFIED: no size or MD5 known"
            state = "present " if result.skipped else "fetched "
            print(f"{state} {f.relpath}  {_human(result.size_bytes)}  [{how}]", flush=True)
            if f.extract and extract_archives:
                n = extract(dest, root)
                if n >= 0:
                    print(f"extracted {f.relpath}: {n} files into {root}", flush=True)
        except MetadataError as e:
            failed += 1
            print(f"error: {f.relpath}: {e}", file=sys.stderr, flush=True)
        except OSError as e:
            failed += 1
            print(f"error: {f.relpath}: {e.strerror or e} ({e.filename or dest})", file=sys.stderr, flush=True)
    if failed:
        print(f"error: {failed} of {len(files)} files failed", file=sys.stderr)
        return 1
    return 0
