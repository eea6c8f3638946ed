"""Streaming readers for input lists: Open Images image lists, CVDF id lists, URL lists.

Lists are read one record at a time and never held whole in memory: a real list has 9M rows
and several GB. Supported formats, recognised by content (not by file name):

* Open Images image lists of every release: a CSV header with ``ImageID`` and
  ``OriginalURL`` (11 columns for v1-v3, 12 with ``Rotation`` from v4; columns are found by
  name, case-insensitively) or the v4 legacy ``image_name,image_url`` lists. A header-less
  file whose first record looks like an 11/12-column Open Images row (e.g. a ``split -l``
  piece) is read with the standard column order.
* CVDF mirror id lists: one ``split/ImageID`` per line (``train/f9e0434389a1d4dd``, optional
  ``.jpg``), and lists of bare ImageIDs (a one-column CSV with header ``ImageID``, or one
  hex id per line).
* Plain URL lists: one http(s) URL per line (optional first line ``url``); the ImageID is
  derived from the URL (:func:`url_image_id`).

Every list may be gzip-compressed (detected by magic bytes), may start with a UTF-8 BOM and
may use CRLF line ends. In line-oriented lists blank lines and ``#`` comments are skipped.

Problems inside a list never raise: a malformed record is yielded as a :class:`BadRow` so the
run records it as failed and goes on. A list that cannot be opened or is no known format
raises :class:`ListError` (a one-line message for the user) before the first row is yielded;
a list that becomes unreadable half-way (a truncated ``.gz``) raises :class:`ListBroken` from
the iterator, or, given ``on_broken``, is reported to it and the next list is read.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import csv
import enum
import gzip
import hashlib
import io
import itertools
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TypeVar

from engine.errors import Reason

#: Values of ``--subset``; also the splits a CVDF ``split/ImageID`` line may name.
SUBSETS: tuple[str, ...] = ("train", "validation", "test", "challenge2018")

#: Where the CVDF mirror serves an id list's images (``original_url`` of ``split/ImageID`` rows).
CVDF_URL = "https://open-images-dataset.s3.amazonaws.com/{split}/{image_id}.jpg"

#: Column order of header-less Open Images lists (v1-v3; v4+ appends ``Rotation``).
OPENIMAGES_COLUMNS: tuple[str, ...] = (
    "ImageID",
    "Subset",
    "OriginalURL",
    "OriginalLandingURL",
    "License",
    "AuthorProfileURL",
    "Author",
    "Title",
    "OriginalSize",
    "OriginalMD5",
    "Thumbnail300KURL",
)

# The format is decided from the first line; 64 KiB holds any real header many times over.
_SNIFF_BYTES = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
# Files users plausibly pass by mistake, named so the error says what the file is.
_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"PK\x03\x04", "a zip archive"),
    (b"(\xb5/\xfd", "a zstd archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_TEXT_CHUNK_CHARS = 1 << 16  # bigger reads than TextIOWrapper's 8 KiB default: fewer calls
_MAX_ERROR_VALUE_CHARS = 40  # values quoted in BadRow messages are cut to this length
_BLANK_LINES = (b"\n", b"\r\n", b"\r")

_hex16 = re.compile(r"[0-9a-fA-F]{16}").fullmatch
_safe_id = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}").fullmatch
# 16 bytes are 22 base64 characters and "=="; the 22nd carries 2 data bits and 4 zero bits,
# so only A, Q, g and w are canonical there (anything else is a corrupted value).
_b64_md5 = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==").fullmatch


class ListKind(str, enum.Enum):
    OPENIMAGES = "openimages"
    IDS = "ids"
    URLS = "urls"

    def __str__(self) -> str:
        return self.value


class ListError(Exception):
    """A list cannot be read at all; the message is one line, fit to show the user."""


_T = TypeVar("_T")
log = logging.getLogger(__name__)


def next_or_none(feed: Iterator[_T], broken: list[str]) -> _T | None:
    """The feed's next item, or None at its end or when a list can no longer be read at all
    (gone since the start: logged once and added to ``broken``; the rows before it stand).
    A list that breaks part-way is reported through ``iter_rows``' ``on_broken`` instead."""
    try:
        return next(feed)
    except StopIteration:
        return None
    except ListError as e:
        log.error("%s; the rows before it are processed, the rest of that list is not", e)
        broken.append(str(e))
        return None


class ListBroken(ListError):
    """A list that became unreadable part-way: its records up to ``line`` were read."""

    def __init__(self, list_index: int, path: str, line: int, error: BaseException) -> None:
        self.list_index = list_index
        self.path = path
        self.line = line  # the last physical line read
        # gzip's EOFError: the file ends before its compressed stream does (a cut download)
        self.reason = Reason.TRUNCATED if isinstance(error, EOFError) else Reason.CORRUPT
        self.detail = _describe(error)
        super().__init__(f"{path}: unreadable after line {line} ({self.detail})")


@dataclass(frozen=True)
class ListInfo:
    path: str
    kind: ListKind
    #: The list's own header columns; ("url",) for URL lists, ("ImageID",) or
    #: ("split/ImageID",) for id lists.
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    list_index: int  # index of the list in the run's list of paths
    line: int  # 1-based physical line where the record starts
    image_id: str  # validated: safe as a file name (see is_safe_image_id)
    subset: str | None
    original_url: str | None
    thumbnail_url: str | None
    original_size: int | None  # bytes
    original_md5: str | None  # base64 of the raw 16-byte digest, exactly as in the list
    rotation: float | None  # degrees; None when empty/nan/absent
    fields: tuple[str, ...]  # the raw record in the list's own columns


@dataclass(frozen=True, slots=True)
class BadRow:
    list_index: int
    line: int
    path: str
    error: str  # short human message, e.g. "expected 11 fields, got 9"
    fields: tuple[str, ...]
    # Additions beyond the agreed interface, both defaulted: the taxonomy category the row
    # fails with, and its ImageID when that one is valid (so the failure can be recorded
    # under its id; None when the id itself is the problem or unknown).
    reason: Reason = Reason.MALFORMED_ROW
    image_id: str | None = None


_new_object = object.__new__


def _row(
    list_index: int,
    line: int,
    image_id: str,
    subset: str | None,
    original_url: str | None,
    thumbnail_url: str | None,
    original_size: int | None,
    original_md5: str | None,
    rotation: float | None,
    fields: tuple[str, ...],
) -> Row:
    """Exactly ``Row(...)``, about twice as fast.

    A frozen dataclass's ``__init__`` pays one ``object.__setattr__`` call per field; at
    100k+ rows/s that is a large share of the whole parse, so fill the instance dict at once.
    """
    row = _new_object(Row)
    row.__dict__.update(
        list_index=list_index,
        line=line,
        image_id=image_id,
        subset=subset,
        original_url=original_url,
        thumbnail_url=thumbnail_url,
        original_size=original_size,
        original_md5=original_md5,
        rotation=rotation,
        fields=fields,
    )
    return row


class _Layout(enum.Enum):
    CSV = "csv"  # a CSV with (or, for Open Images rows, without) a header
    SPLIT_IDS = "split_ids"  # split/ImageID per line
    HEX_IDS = "hex_ids"  # a bare ImageID per line
    URLS = "urls"  # a URL per line


@dataclass(frozen=True, slots=True)
class _Columns:
    """Where each field we use sits in a CSV record (None: the list has no such column)."""

    count: int
    image_id: int
    subset: int | None = None
    url: int | None = None
    thumbnail: int | None = None
    size: int | None = None
    md5: int | None = None
    rotation: int | None = None
    strip_jpg: bool = False  # legacy v4 lists name the image "<ImageID>.jpg"


@dataclass(frozen=True, slots=True)
class _Format:
    info: ListInfo
    gzip: bool
    layout: _Layout
    header_line: int  # physical line of the header; 0 when the list has none
    columns: _Columns | None  # CSV layout only


# ----------------------------------------------------------------------------------------
# Public helpers


def is_safe_image_id(s: str) -> bool:
    """True when ``s`` can be used as a file name: ``[A-Za-z0-9_-]{1,128}``, not starting with ``-``."""
    return isinstance(s, str) and _safe_id(s) is not None


def url_image_id(url: str) -> str:
    """The ImageID of a URL-list entry: the first 16 hex digits of the SHA-1 of the URL.

    Stable across runs and machines; the URL is hashed exactly as given (no normalisation).
    """
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def md5_b64_to_hex(b64: str) -> str:
    """Hex form of an ``OriginalMD5`` value (base64 of the raw 16-byte digest).

    Raises ValueError unless ``b64`` is canonical base64 of exactly 16 bytes.
    """
    if not isinstance(b64, str) or _b64_md5(b64) is None:
        raise ValueError(f"not a base64 MD5 digest: {_short(str(b64))!r}")
    return binascii.a2b_base64(b64).hex()


def list_info(path: str) -> ListInfo:
    """Recognise a list's format from its content; raises ListError if it is not a list."""
    return _sniff(path).info


def iter_rows(
    paths: Sequence[str],
    *,
    subset: str | None = None,
    limit: int | None = None,
    on_broken: Callable[[ListBroken], None] | None = None,
) -> Iterator[Row | BadRow]:
    """Stream the records of every list in ``paths``, in order.

    ``subset`` keeps only rows of that subset; rows whose list does not say a subset (URL
    lists, bare ImageID lists, legacy v4 lists) are kept. ``limit`` stops after that many
    items (rows and bad rows) in total. Every list is checked before the first row is
    yielded, so a missing or foreign file raises ListError here, not half-way. A list that
    breaks part-way raises ListBroken from the iterator; with ``on_broken`` it is passed to
    that instead, and the rows of the lists after it are still read.
    """
    _check_subset(subset)
    if limit is not None and limit < 0:
        raise ListError(f"--limit must be 0 or more, not {limit}")
    formats = [_sniff(p) for p in paths]
    return _iter_all(formats, subset, limit, on_broken)


def batches(items: Iterator[Row | BadRow], n: int) -> Iterator[list[Row | BadRow]]:
    """Lists of up to ``n`` consecutive items (one state-DB lookup of finished rows per list)."""
    while batch := list(itertools.islice(items, n)):
        yield batch


def count_rows(paths: Sequence[str], *, subset: str | None = None) -> int:
    """How many items :func:`iter_rows` yields for these lists (without ``limit``).

    CSV lists are counted from their lines without parsing every field: a record ends at a
    line end outside double quotes, so quoted line breaks are handled. Exact for well-formed
    CSV; a list with stray quotes inside unquoted fields may count differently.
    """
    _check_subset(subset)
    formats = [_sniff(p) for p in paths]
    return sum(_count(fmt, subset) for fmt in formats)


# ----------------------------------------------------------------------------------------
# Format recognition


def _sniff(path: str) -> _Format:
    path = str(path)
    with _translate_open_errors(path):
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    compressed = head.startswith(_GZIP_MAGIC)
    if compressed:
        try:
            with gzip.open(path, "rb") as g:
                head = g.read(_SNIFF_BYTES)
        except (OSError, EOFError, zlib.error) as e:
            raise ListError(f"{path}: damaged gzip file ({_describe(e)})") from None
    for magic, what in _FOREIGN_MAGIC:
        if head.startswith(magic):
            raise ListError(f"{path}: this is {what}, not a list (lists are text, optionally gzipped)")
    if head[257:262] == b"ustar":
        raise ListError(f"{path}: this is a tar archive; extract the list (e.g. images.csv) from it first")
    if b"\0" in head:
        raise ListError(f"{path}: binary data, not a text list")
    complete = len(head) < _SNIFF_BYTES
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=complete)
    except UnicodeDecodeError:
        raise ListError(f"{path}: not UTF-8 text, not a list") from None

    lines = text.split("\n")
    if not complete:
        lines.pop()  # possibly cut short by the sniff window
    for number, raw in enumerate(lines, 1):
        first = raw.strip()
        if first and not first.startswith("#"):
            return _recognise(path, compressed, number, first)
    if not complete:
        raise ListError(f"{path}: first line longer than {_SNIFF_BYTES // 1024} KiB, not a list")
    raise ListError(f"{path}: the list is empty")


def _recognise(path: str, compressed: bool, number: int, first: str) -> _Format:
    """Decide the format from the first non-blank, non-comment line (``number``)."""
    low = first.lower()
    if low.startswith(("http://", "https://")):
        return _Format(ListInfo(path, ListKind.URLS, ("url",)), compressed, _Layout.URLS, 0, None)
    if low == "url":
        return _Format(ListInfo(path, ListKind.URLS, ("url",)), compressed, _Layout.URLS, number, None)
    if first.partition("/")[0] in SUBSETS:
        info = ListInfo(path, ListKind.IDS, ("split/ImageID",))
        return _Format(info, compressed, _Layout.SPLIT_IDS, 0, None)
    if _hex16(_strip_jpg(first)):
        return _Format(ListInfo(path, ListKind.IDS, ("ImageID",)), compressed, _Layout.HEX_IDS, 0, None)

    try:
        header = tuple(name.strip() for name in next(csv.reader([first])))
    except csv.Error:  # e.g. a lone CR (old Mac line ends) inside the line
        raise ListError(f"{path}: unknown list format (first line is not CSV: {_short(first)!r})") from None
    names = [name.lower() for name in header]
    position: dict[str, int] = {}
    for i, name in enumerate(names):
        position.setdefault(name, i)  # the first of duplicated names wins
    columns: _Columns | None = None
    kind = ListKind.OPENIMAGES
    if "imageid" in position and "originalurl" in position:
        columns = _Columns(
            count=len(header),
            image_id=position["imageid"],
            subset=position.get("subset"),
            url=position["originalurl"],
            thumbnail=position.get("thumbnail300kurl"),
            size=position.get("originalsize"),
            md5=position.get("originalmd5"),
            rotation=position.get("rotation"),
        )
    elif "image_name" in position and "image_url" in position:
        columns = _Columns(
            count=len(header),
            image_id=position["image_name"],
            url=position["image_url"],
            strip_jpg=True,
        )
    elif names == ["imageid"]:
        kind = ListKind.IDS
        columns = _Columns(count=1, image_id=0)
    elif _looks_like_openimages_row(header):
        # A header-less piece of an image list: the first line is already a record.
        header = OPENIMAGES_COLUMNS + (("Rotation",) if len(header) == 12 else ())
        columns = _Columns(
            count=len(header),
            image_id=0,
            subset=1,
            url=2,
            thumbnail=10,
            size=8,
            md5=9,
            rotation=11 if len(header) == 12 else None,
        )
        info = ListInfo(path, ListKind.OPENIMAGES, header)
        return _Format(info, compressed, _Layout.CSV, number - 1, columns)
    if columns is None:
        raise ListError(
            f"{path}: unknown list format (first line: {_short(first)!r}); expected an Open Images "
            "image list (CSV with ImageID and OriginalURL columns), split/ImageID lines, "
            "ImageIDs or http(s) URLs"
        )
    return _Format(ListInfo(path, kind, header), compressed, _Layout.CSV, number, columns)


def _looks_like_openimages_row(fields: tuple[str, ...]) -> bool:
    return (
        len(fields) in (11, 12)
        and _hex16(fields[0]) is not None
        and fields[2].lower().startswith(("http://", "https://"))
    )


# ----------------------------------------------------------------------------------------
# Reading


def _iter_all(
    formats: list[_Format], subset: str | None, limit: int | None, on_broken: Callable[[ListBroken], None] | None
) -> Iterator[Row | BadRow]:
    if limit == 0:
        return
    remaining = limit
    for index, fmt in enumerate(formats):
        reader = _csv_rows if fmt.layout is _Layout.CSV else _line_rows
        try:
            # closing(): stopping at the limit must close this list's file now, not at GC.
            with contextlib.closing(reader(index, fmt, subset)) as rows:
                if remaining is None:
                    yield from rows
                    continue
                for item in rows:
                    yield item
                    remaining -= 1
                    if remaining == 0:
                        return
        except ListBroken as e:
            if on_broken is None:
                raise
            on_broken(e)


def _csv_rows(index: int, fmt: _Format, subset: str | None) -> Iterator[Row | BadRow]:
    cols = fmt.columns
    assert cols is not None
    path = fmt.info.path
    # A list without a Subset column says nothing about subsets: keep all its rows.
    want = subset if cols.subset is not None else None
    subset_col = cols.subset if cols.subset is not None else 0
    count = cols.count
    parse = _record_parser(index, path, cols)
    last = 0  # physical line where the previous record ended
    with _open_text(fmt, newline="") as text:
        reader = csv.reader(text)
        try:
            while last < fmt.header_line:  # skip the header and anything before it
                try:
                    next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    pass
                if reader.line_num == last:
                    return
                last = reader.line_num
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    start, last = last + 1, reader.line_num
                    yield BadRow(index, start, path, f"unparseable CSV: {e}", ())
                    if reader.line_num < start:  # nothing consumed: stop rather than spin
                        return
                    continue
                start, last = last + 1, reader.line_num
                if not record:
                    continue  # a blank line
                if want is not None and len(record) > subset_col and record[subset_col] != want:
                    continue
                if len(record) != count:
                    message = f"expected {count} fields, got {len(record)}"
                    yield BadRow(index, start, path, message, tuple(record), image_id=_known_id(record, cols))
                    continue
                yield parse(start, record)
        except (OSError, EOFError, zlib.error) as e:
            raise ListBroken(index, path, last, e) from None


# Rotation as written by the v4+ lists, parsed without float() for the common values.
_ROTATIONS: dict[str, float | None] = {"": None, "nan": None, "0.0": 0.0, "90.0": 90.0, "180.0": 180.0, "270.0": 270.0}


def _record_parser(index: int, path: str, cols: _Columns) -> Callable[[int, list[str]], Row | BadRow]:
    """A function turning one CSV record of the right length into a Row or BadRow."""
    # A column the list lacks reads the "" appended to every record: no per-row None tests.
    absent = cols.count
    i_id = cols.image_id
    i_subset = absent if cols.subset is None else cols.subset
    i_url = absent if cols.url is None else cols.url
    i_thumbnail = absent if cols.thumbnail is None else cols.thumbnail
    i_size = absent if cols.size is None else cols.size
    i_md5 = absent if cols.md5 is None else cols.md5
    i_rotation = absent if cols.rotation is None else cols.rotation
    strip_jpg = cols.strip_jpg

    def parse(line: int, record: list[str]) -> Row | BadRow:
        fields = tuple(record)
        record.append("")
        image_id = record[i_id]
        if strip_jpg:
            image_id = _strip_jpg(image_id)
        if _hex16(image_id) is None:
            return BadRow(index, line, path, _bad_id_message(image_id), fields, Reason.BAD_ID)
        image_id = image_id.lower()
        size: int | None = None
        if text := record[i_size]:
            if not (text.isascii() and text.isdigit()):
                return _bad_field(index, line, path, fields, image_id, "OriginalSize", text, "is not a whole number")
            size = int(text)
        md5 = record[i_md5] or None
        if md5 is not None and _b64_md5(md5) is None:
            return _bad_field(index, line, path, fields, image_id, "OriginalMD5", md5, "is not a base64 MD5")
        text = record[i_rotation]
        rotation = _ROTATIONS.get(text, math.nan)
        if rotation is not None and math.isnan(rotation):
            rotation = _parse_rotation(text)
            if rotation is None and text.strip().lower() != "nan":
                return _bad_field(index, line, path, fields, image_id, "Rotation", text, "is not a number")
        return _row(
            index,
            line,
            image_id,
            record[i_subset] or None,
            record[i_url] or None,
            record[i_thumbnail] or None,
            size,
            md5,
            rotation,
            fields,
        )

    return parse


def _parse_rotation(text: str) -> float | None:
    """Degrees from an uncommon spelling ("90", " 180.0 "); None if not a finite number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _line_rows(index: int, fmt: _Format, subset: str | None) -> Iterator[Row | BadRow]:
    path = fmt.info.path
    layout = fmt.layout
    number = 0
    with _open_text(fmt, newline=None) as text:
        try:
            for number, raw in enumerate(text, 1):
                entry = raw.strip()
                if not entry or entry[0] == "#" or number <= fmt.header_line:
                    continue
                if layout is _Layout.URLS:
                    yield _url_row(index, number, path, entry)
                elif layout is _Layout.SPLIT_IDS:
                    item = _split_row(index, number, path, entry, subset)
                    if item is not None:
                        yield item
                else:
                    yield _hex_row(index, number, path, entry)
        except (OSError, EOFError, zlib.error) as e:
            raise ListBroken(index, path, number, e) from None


def _url_row(index: int, line: int, path: str, url: str) -> Row | BadRow:
    if not url[:8].lower().startswith(("http://", "https://")):
        return BadRow(index, line, path, f"not an http(s) URL: {_short(url)!r}", (url,), Reason.BAD_URL)
    if " " in url or not url.isprintable():
        message = f"URL contains spaces or control characters: {_short(url)!r}"
        return BadRow(index, line, path, message, (url,), Reason.BAD_URL)
    return _row(index, line, url_image_id(url), None, url, None, None, None, None, (url,))


def _split_row(index: int, line: int, path: str, entry: str, subset: str | None) -> Row | BadRow | None:
    split, slash, name = entry.partition("/")
    if not slash or split not in SUBSETS:
        message = f"expected split/ImageID with split one of {', '.join(SUBSETS)}: {_short(entry)!r}"
        return BadRow(index, line, path, message, (entry,))
    if subset is not None and split != subset:
        return None
    image_id = _strip_jpg(name)
    if _hex16(image_id) is None:
        return BadRow(index, line, path, _bad_id_message(image_id), (entry,), Reason.BAD_ID)
    image_id = image_id.lower()
    url = CVDF_URL.format(split=split, image_id=image_id)
    return _row(index, line, image_id, split, url, None, None, None, None, (entry,))


def _hex_row(index: int, line: int, path: str, entry: str) -> Row | BadRow:
    image_id = _strip_jpg(entry)
    if _hex16(image_id) is None:
        return BadRow(index, line, path, _bad_id_message(image_id), (entry,), Reason.BAD_ID)
    return _row(index, line, image_id.lower(), None, None, None, None, None, None, (entry,))


# ----------------------------------------------------------------------------------------
# Counting


def _count(fmt: _Format, subset: str | None) -> int:
    path = fmt.info.path
    try:
        if fmt.layout is _Layout.CSV:
            return _count_csv(fmt, subset)
        return _count_lines(fmt, subset)
    except (OSError, EOFError, zlib.error) as e:
        raise ListError(f"{path}: unreadable ({_describe(e)})") from None


def _count_csv(fmt: _Format, subset: str | None) -> int:
    cols = fmt.columns
    assert cols is not None
    column = cols.subset if subset is not None else None
    want = subset.encode() if subset is not None else b""
    total = 0
    quoted = False  # inside a quoted field that continues on the next line
    with _open_binary(fmt) as data:
        # Binary line iteration and bytes.count run in C; parsing every field with csv is
        # several times slower, and a count over 9M rows should take seconds.
        for line in itertools.islice(data, fmt.header_line, None):
            starts_record = not quoted
            if line.count(b'"') & 1:
                quoted = not quoted
            if not starts_record or line in _BLANK_LINES:
                continue
            if column is not None:
                value = _csv_field(line, column)
                if value is not None and value != want:
                    continue
            total += 1
    return total


def _csv_field(line: bytes, column: int) -> bytes | None:
    """Field ``column`` of the record starting on ``line``, or None if it has fewer fields."""
    parts = line.split(b",", column + 1)
    if len(parts) <= column:
        return None
    end = len(line) - len(parts[-1]) if len(parts) > column + 1 else len(line)  # through the field
    if line.find(b'"', 0, end) == -1:
        return parts[column].rstrip(b"\r\n")
    # A quoted field before or at the column: let csv work it out (rare in real lists).
    try:
        record = next(csv.reader([line.decode("utf-8", "replace")]), [])
    except csv.Error:
        return None  # iter_rows reports this record as a BadRow: count it
    return record[column].rstrip("\r\n").encode() if len(record) > column else None


def _count_lines(fmt: _Format, subset: str | None) -> int:
    total = 0
    by_split = fmt.layout is _Layout.SPLIT_IDS and subset is not None
    with _open_text(fmt, newline=None) as text:
        for number, raw in enumerate(text, 1):
            entry = raw.strip()
            if not entry or entry[0] == "#" or number <= fmt.header_line:
                continue
            if by_split:
                split = entry.partition("/")[0]
                if split in SUBSETS and split != subset:
                    continue
            total += 1
    return total


# ----------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def _translate_open_errors(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise ListError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ListError(f"{path}: is a directory, not a list") from None
    except PermissionError:
        raise ListError(f"{path}: permission denied") from None
    except OSError as e:
        raise ListError(f"{path}: cannot read ({_describe(e)})") from None


@contextlib.contextmanager
def _open_binary(fmt: _Format) -> Iterator[IO[bytes]]:
    path = fmt.info.path
    with _translate_open_errors(path):
        data: IO[bytes] = gzip.open(path, "rb") if fmt.gzip else open(path, "rb", buffering=1 << 20)
    with data:
        yield data


@contextlib.contextmanager
def _open_text(fmt: _Format, newline: str | None) -> Iterator[io.TextIOWrapper]:
    with _open_binary(fmt) as data:
        # errors="replace": a stray invalid byte deep in a 3 GB list must not end the run;
        # it can only land in free text or make that row's fields invalid (then a BadRow).
        wrapper = io.TextIOWrapper(data, encoding="utf-8-sig", errors="replace", newline=newline)  # type: ignore[arg-type]
        with wrapper as text:
            text._CHUNK_SIZE = _TEXT_CHUNK_CHARS  # type: ignore[attr-defined]
            yield text


def _known_id(record: list[str], cols: _Columns) -> str | None:
    """The valid ImageID of a record that is malformed otherwise, if it has one."""
    if len(record) <= cols.image_id:
        return None
    image_id = record[cols.image_id]
    if cols.strip_jpg:
        image_id = _strip_jpg(image_id)
    return image_id.lower() if _hex16(image_id) else None


def _check_subset(subset: str | None) -> None:
    if subset is not None and subset not in SUBSETS:
        raise ListError(f"unknown subset {subset!r}; expected one of: {', '.join(SUBSETS)}")


def _strip_jpg(name: str) -> str:
    return name[:-4] if name[-4:].lower() == ".jpg" else name


def _short(value: str) -> str:
    if len(value) <= _MAX_ERROR_VALUE_CHARS:
        return value
    return value[: _MAX_ERROR_VALUE_CHARS - 3] + "..."


def _bad_id_message(image_id: str) -> str:
    return f"bad ImageID {_short(image_id)!r} (expected 16 hex digits)"


def _bad_field(
    index: int, line: int, path: str, fields: tuple[str, ...], image_id: str, name: str, value: str, problem: str
) -> BadRow:
    return BadRow(index, line, path, f"{name} {_short(value)!r} {problem}", fields, Reason.MALFORMED_ROW, image_id)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
