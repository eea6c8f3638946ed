"""Tests for engine.inputs: streaming list readers, on real Open Images samples and generated lists."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import re
import tarfile
import time
from pathlib import Path

import psutil
import pytest

from engine.errors import Reason
from engine.inputs import (
    CVDF_URL,
    BadRow,
    ListError,
    ListKind,
    Row,
    count_rows,
    is_safe_image_id,
    iter_rows,
    list_info,
    md5_b64_to_hex,
    url_image_id,
)
from engine.inputs import OPENIMAGES_COLUMNS

V3_COLUMNS = list(OPENIMAGES_COLUMNS)
V4_COLUMNS = V3_COLUMNS + ["Rotation"]
SPLITS = ("train", "validation", "test")


#: real Open Images V3 (2017_11) samples kept in the repository (see tests/data/README.md)
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real V3 (2017_11) images.csv of each split, extracted into a temporary directory."""
    out = tmp_path_factory.mktemp("samples")
    with tarfile.open(DATA / "test_images_2017_11.tar.gz") as tar:
        tar.extractall(out, filter="data")
    return out / "2017_11"


@pytest.fixture(scope="module")
def annotations_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("annotations")
    with tarfile.open(DATA / "test_annotations_human_2017_11.tar.gz") as tar:
        tar.extractall(out, filter="data")
    return out / "2017_11" / "validation" / "annotations-human.csv"


def _write_csv(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = False, gz: bool = False) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)  # default line terminator: CRLF, as in the v4+ lists
    writer.writerow(header)
    writer.writerows(rows)
    data = (("\ufeff" if bom else "") + buffer.getvalue()).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _v4_row(image_id: str, subset: str = "train", **overrides: str) -> list[str]:
    values = {
        "ImageID": image_id,
        "Subset": subset,
        "OriginalURL": f"https://c1.staticflickr.com/5/1/{image_id}_o.jpg",
        "OriginalLandingURL": f"https://www.flickr.com/photos/x/{image_id}",
        "License": "https://creativecommons.org/licenses/by/2.0/",
        "AuthorProfileURL": "https://www.flickr.com/people/x/",
        "Author": "Someone",
        "Title": "A title",
        "OriginalSize": "211079",
        "OriginalMD5": "0Sad+xMj2ttXM1U8meEJ0A==",
        "Thumbnail300KURL": f"https://c1.staticflickr.com/5/1/{image_id}_z.jpg",
        "Rotation": "0.0",
    }
    values.update(overrides)
    return [values[c] for c in V4_COLUMNS]


def _rows(paths: list[Path], **kwargs: object) -> list[Row | BadRow]:
    return list(iter_rows([str(p) for p in paths], **kwargs))  # type: ignore[arg-type]


def _good(items: list[Row | BadRow]) -> list[Row]:
    assert all(isinstance(i, Row) for i in items), [i for i in items if isinstance(i, BadRow)]
    return items  # type: ignore[return-value]


# -- real Open Images V3 samples ---------------------------------------------------------


def test_real_v3_lists_parse_completely(samples: Path) -> None:
    for split in SPLITS:
        path = samples / split / "images.csv"
        info = list_info(str(path))
        assert info.kind is ListKind.OPENIMAGES
        assert info.columns == tuple(V3_COLUMNS)
        rows = _good(_rows([path]))
        assert len(rows) == 1000
        assert count_rows([str(path)]) == 1000
        assert {r.subset for r in rows} == {split}
        assert [r.line for r in rows] == list(range(2, 1002))  # no quoted newlines in these files
        for r in rows:
            assert re.fullmatch(r"[0-9a-f]{16}", r.image_id) and r.image_id == r.fields[0]
            assert r.original_url and r.original_url.startswith("https://")
            assert r.original_size is not None and r.original_size > 0
            assert r.original_md5 is not None and len(md5_b64_to_hex(r.original_md5)) == 32
            assert r.rotation is None  # no Rotation column before v4
            assert len(r.fields) == 11
        # 2-4% of rows have no thumbnail: None, not "".
        assert 0 < sum(r.thumbnail_url is None for r in rows) < 100


def test_real_v3_row_values(samples: Path) -> None:
    rows = _good(_rows([samples / "train" / "images.csv"]))
    first = rows[0]
    assert first.image_id == "000002b66c9c498e"
    assert first.original_size == 141489
    assert first.original_url == "https://c7.staticflickr.com/6/5499/10245691204_98dce75b5a_o.jpg"
    second = rows[1]
    # A quoted Author with an HTML entity stays exactly as written.
    assert second.fields[6] == "Daniel X. O&#x27;Neil"
    assert second.original_md5 == "CyvuYIfw90WAr8y0a1PaOw=="
    assert second.list_index == 0 and second.line == 3


def test_real_lists_together_subset_and_limit(samples: Path) -> None:
    paths = [samples / s / "images.csv" for s in SPLITS]
    every = _good(_rows(paths))
    assert len(every) == 3000
    assert [r.list_index for r in every] == [0] * 1000 + [1] * 1000 + [2] * 1000

    validation = _good(_rows(paths, subset="validation"))
    assert len(validation) == 1000 and {(r.list_index, r.subset) for r in validation} == {(1, "validation")}
    assert count_rows([str(p) for p in paths], subset="validation") == 1000

    limited = _good(_rows(paths, limit=1500))
    assert len(limited) == 1500 and limited[-1].list_index == 1 and limited[-1].line == 501
    assert _rows(paths, limit=0) == []
    assert len(_rows(paths, subset="test", limit=7)) == 7


def test_headerless_piece_of_an_image_list(samples: Path, tmp_path: Path) -> None:
    lines = (samples / "test" / "images.csv").read_bytes().splitlines(keepends=True)
    piece = tmp_path / "piece.csv"
    piece.write_bytes(b"".join(lines[501:]))  # like `split -l`: no header
    info = list_info(str(piece))
    assert info.kind is ListKind.OPENIMAGES and info.columns == tuple(V3_COLUMNS)
    rows = _good(_rows([piece]))
    assert len(rows) == 500 == count_rows([str(piece)])
    assert rows[0].line == 1 and rows[0].image_id == lines[501].split(b",")[0].decode()


def test_annotation_file_is_not_a_list(annotations_csv: Path) -> None:
    with pytest.raises(ListError, match="unknown list format"):
        list_info(str(annotations_csv))


def test_metadata_tarball_is_not_a_list() -> None:
    with pytest.raises(ListError, match="tar archive"):
        list_info(str(DATA / "test_images_2017_11.tar.gz"))


# -- generated v4+ lists -----------------------------------------------------------------


def test_v4_quoting_bom_crlf_and_rotation(tmp_path: Path) -> None:
    rows = [
        _v4_row("000000000000000a", Title='Fiat 500 "topolino", 1936', Rotation="90.0"),
        _v4_row("000000000000000b", Title="two\nlines\r\nand, a comma", Author='"quoted"', Rotation=""),
        _v4_row("000000000000000c", Rotation="NaN", Thumbnail300KURL=""),
        _v4_row("000000000000000d", subset="test", Rotation="270", OriginalSize="", OriginalMD5=""),
        _v4_row("00000000000000EE", subset="validation", Rotation="180.0"),
    ]
    path = _write_csv(tmp_path / "v4.csv", V4_COLUMNS, rows, bom=True)
    assert b"\r\n" in path.read_bytes()
    info = list_info(str(path))
    assert info.kind is ListKind.OPENIMAGES and info.columns == tuple(V4_COLUMNS)
    got = _good(_rows([path]))
    assert [r.line for r in got] == [2, 3, 6, 7, 8]  # row b spans lines 3-5
    assert got[0].fields[7] == 'Fiat 500 "topolino", 1936'
    assert got[1].fields[7] == "two\nlines\r\nand, a comma" and got[1].fields[6] == '"quoted"'
    assert [r.rotation for r in got] == [90.0, None, None, 270.0, 180.0]
    assert got[2].thumbnail_url is None
    assert got[3].original_size is None and got[3].original_md5 is None
    assert got[4].image_id == "00000000000000ee" and got[4].fields[0] == "00000000000000EE"
    assert [r.fields for r in got] == [tuple(r) for r in rows]
    assert count_rows([str(path)]) == 5
    assert count_rows([str(path)], subset="train") == 3
    assert [r.image_id for r in _good(_rows([path], subset="train"))] == [
        "000000000000000a",
        "000000000000000b",
        "000000000000000c",
    ]


def test_fully_quoted_list_counts_like_it_parses(tmp_path: Path) -> None:
    subsets = ["train", "test", "validation"]
    rows = [_v4_row(f"{i:016x}", subsets[i % 3], Title="x\ny" if i % 4 == 0 else "t") for i in range(40)]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL)
    writer.writerow(V4_COLUMNS)
    writer.writerows(rows)
    path = tmp_path / "quoted.csv.gz"
    path.write_bytes(gzip.compress(buffer.getvalue().encode()))
    for subset in (None, "train", "test", "validation"):
        parsed = _good(_rows([path], subset=subset))
        assert count_rows([str(path)], subset=subset) == len(parsed)
        assert all(subset in (None, r.subset) for r in parsed)
    assert len(_rows([path], subset="test")) == 13


def test_columns_found_by_name_not_position(tmp_path: Path) -> None:
    order = ["rotation", "originalmd5", "IMAGEID", "Title", "OriginalURL", "Subset", "OriginalSize"]
    source = _v4_row("0123456789abcdef", Rotation="90.0", Title="t, with comma")
    by_name = dict(zip([c.lower() for c in V4_COLUMNS], source))
    path = _write_csv(tmp_path / "reordered.csv", order, [[by_name[c.lower()] for c in order]])
    assert list_info(str(path)).columns == tuple(order)
    (row,) = _good(_rows([path]))
    assert (row.image_id, row.subset, row.original_size, row.rotation) == ("0123456789abcdef", "train", 211079, 90.0)
    assert row.original_url == by_name["originalurl"] and row.thumbnail_url is None


def test_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    rows = [_v4_row(f"{i:016x}", Title="a\nb" if i == 1 else "t") for i in range(3)]
    plain = _write_csv(tmp_path / "plain.csv", V4_COLUMNS, rows)
    gz = _write_csv(tmp_path / "list.csv.gz", V4_COLUMNS, rows, gz=True)
    disguised = tmp_path / "gzipped-but-named.csv"
    disguised.write_bytes(gz.read_bytes())
    misnamed = tmp_path / "plain-but-named.csv.gz"
    misnamed.write_bytes(plain.read_bytes())
    expected = _good(_rows([plain]))
    assert [r.line for r in expected] == [2, 3, 5]
    for path in (gz, disguised, misnamed):
        assert _good(_rows([path])) == expected
        assert count_rows([str(path)]) == 3


def test_legacy_v4_two_column_list(tmp_path: Path) -> None:
    url = "https://requestor-proxy.figure-eight.com/figure_eight_datasets/open-images/train/e39871fd9fd74f55.jpg"
    path = _write_csv(tmp_path / "boxable.csv", ["image_name", "image_url"], [["e39871fd9fd74f55.jpg", url]])
    info = list_info(str(path))
    assert info.kind is ListKind.OPENIMAGES and info.columns == ("image_name", "image_url")
    (row,) = _good(_rows([path], subset="train"))  # no Subset column: kept by any subset filter
    assert (row.image_id, row.original_url, row.subset, row.fields) == (
        "e39871fd9fd74f55",
        url,
        None,
        ("e39871fd9fd74f55.jpg", url),
    )


# -- id lists and URL lists --------------------------------------------------------------


def test_cvdf_split_id_list(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text(
        "# images to fetch\n"
        "train/f9e0434389a1d4dd\r\n"
        "\n"
        "validation/0001EEAF4AED83F9.jpg\n"
        "test/000026e7ee790996\n"
        "challenge2018/00000b4dcff7f799\n"
        "holdout/000026e7ee790996\n"
        "train/../../etc/passwd\n"
        "train/f9e0434389a1d4d\n"
    )
    info = list_info(str(path))
    assert (info.kind, info.columns) == (ListKind.IDS, ("split/ImageID",))
    items = _rows([path])
    assert [i.line for i in items] == [2, 4, 5, 6, 7, 8, 9]
    good = [i for i in items if isinstance(i, Row)]
    assert [(r.subset, r.image_id) for r in good] == [
        ("train", "f9e0434389a1d4dd"),
        ("validation", "0001eeaf4aed83f9"),
        ("test", "000026e7ee790996"),
        ("challenge2018", "00000b4dcff7f799"),
    ]
    assert good[0].original_url == "https://open-images-dataset.s3.amazonaws.com/train/f9e0434389a1d4dd.jpg"
    assert good[0].original_url == CVDF_URL.format(split="train", image_id="f9e0434389a1d4dd")
    assert good[1].fields == ("validation/0001EEAF4AED83F9.jpg",)
    bad = [i for i in items if isinstance(i, BadRow)]
    assert [(b.line, b.reason) for b in bad] == [(7, Reason.MALFORMED_ROW), (8, Reason.BAD_ID), (9, Reason.BAD_ID)]
    assert "split/ImageID" in bad[0].error and "ImageID" in bad[1].error
    assert count_rows([str(path)]) == 7

    train = _rows([path], subset="train")
    # A line with an unknown split cannot be placed in any subset: still reported.
    assert [(type(i).__name__, i.line) for i in train] == [("Row", 2), ("BadRow", 7), ("BadRow", 8), ("BadRow", 9)]
    assert count_rows([str(path)], subset="train") == 4


def test_imageid_csv_and_bare_id_lists(tmp_path: Path) -> None:
    with_header = tmp_path / "image_ids.csv"
    with_header.write_text('ImageID\n000002b66c9c498e\n"000002b97e5471a0"\na/b\n')
    info = list_info(str(with_header))
    assert (info.kind, info.columns) == (ListKind.IDS, ("ImageID",))
    items = _rows([with_header])
    assert [(type(i).__name__, i.line) for i in items] == [("Row", 2), ("Row", 3), ("BadRow", 4)]
    assert items[1].image_id == "000002b97e5471a0"  # type: ignore[union-attr]
    assert items[0].original_url is None and items[0].subset is None  # type: ignore[union-attr]
    assert items[2].reason is Reason.BAD_ID  # type: ignore[union-attr]

    bare = tmp_path / "ids.txt"
    bare.write_text("000002b66c9c498e.jpg\n\n# comment\n000002b97e5471a0\n.\n")
    info = list_info(str(bare))
    assert (info.kind, info.columns) == (ListKind.IDS, ("ImageID",))
    items = _rows([bare])
    assert [(type(i).__name__, i.line) for i in items] == [("Row", 1), ("Row", 4), ("BadRow", 5)]
    assert items[0].image_id == "000002b66c9c498e"  # type: ignore[union-attr]
    assert count_rows([str(with_header), str(bare)]) == 6


def test_url_list(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_text(
        "\ufeff# my photos\n"
        "https://example.com/a.jpg\n"
        "   \n"
        "http://127.0.0.1:8000/b.png?x=1  \r\n"
        "ftp://example.com/c.jpg\n"
        "https://example.com/has space.jpg\n",
        encoding="utf-8",
    )
    info = list_info(str(path))
    assert (info.kind, info.columns) == (ListKind.URLS, ("url",))
    items = _rows([path], subset="validation")  # URL lists say nothing about subsets
    assert [i.line for i in items] == [2, 4, 5, 6]
    first, second, ftp, spaced = items
    assert isinstance(first, Row) and isinstance(second, Row)
    # Pinned: the ID must not change between releases, or resumed runs would redo everything.
    assert first.image_id == url_image_id("https://example.com/a.jpg") == "c8cad51b5df249ba"
    assert (first.original_url, first.fields, first.subset) == (
        "https://example.com/a.jpg",
        ("https://example.com/a.jpg",),
        None,
    )
    assert second.original_url == "http://127.0.0.1:8000/b.png?x=1"
    assert isinstance(ftp, BadRow) and ftp.reason is Reason.BAD_URL and "http" in ftp.error
    assert isinstance(spaced, BadRow) and spaced.reason is Reason.BAD_URL
    assert count_rows([str(path)]) == 4

    with_header = tmp_path / "urls.csv"
    with_header.write_text("url\nhttps://example.com/a.jpg\n")
    (row,) = _good(_rows([with_header]))
    assert row.image_id == "c8cad51b5df249ba" and row.line == 2
    assert count_rows([str(with_header)]) == 1


def test_mixed_lists_subset_and_limit_across_lists(tmp_path: Path) -> None:
    oi_rows = [_v4_row(f"{i:016x}", "train" if i % 2 else "test") for i in range(10)]
    oi = _write_csv(tmp_path / "a.csv", V4_COLUMNS, oi_rows)
    ids = tmp_path / "b.txt"
    ids.write_text("".join(f"{'train' if i % 2 else 'test'}/{i + 100:016x}\n" for i in range(10)))
    urls = tmp_path / "c.txt"
    urls.write_text("".join(f"https://example.com/{i}.jpg\n" for i in range(10)))
    paths = [oi, ids, urls]
    assert len(_good(_rows(paths))) == 30 == count_rows([str(p) for p in paths])
    train = _good(_rows(paths, subset="train"))
    assert [r.list_index for r in train] == [0] * 5 + [1] * 5 + [2] * 10
    assert count_rows([str(p) for p in paths], subset="train") == 20
    limited = _good(_rows(paths, subset="test", limit=8))
    assert [(r.list_index, r.subset) for r in limited] == [(0, "test")] * 5 + [(1, "test")] * 3


# -- malformed rows ------------------------------------------------------------------------


def test_malformed_rows_are_reported_not_raised(tmp_path: Path) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(V4_COLUMNS)
    writer.writerow(_v4_row("0000000000000001", Title="spans\nthree\nlines"))  # lines 2-4
    writer.writerow(_v4_row("0000000000000002")[:9])  # line 5: too few fields
    writer.writerow(_v4_row("../etc/passwd"))  # line 6
    writer.writerow(_v4_row("0000000000000003", OriginalSize="12kB"))  # line 7
    writer.writerow(_v4_row("0000000000000004", OriginalMD5="not-base64"))  # line 8
    writer.writerow(_v4_row("0000000000000005", OriginalMD5="0Sad+xMj2ttXM1U8meEJ0B=="))  # line 9: non-canonical
    writer.writerow(_v4_row("0000000000000006", Rotation="left"))  # line 10
    writer.writerow(_v4_row("0000000000000007", OriginalSize="-5"))  # line 11
    writer.writerow(_v4_row("0000000000000008") + ["extra"])  # line 12
    buffer.write("\n")  # line 13: blank, skipped
    writer.writerow(_v4_row("0000000000000009", Rotation="inf"))  # line 14
    writer.writerow(_v4_row("000000000000000a"))  # line 15
    path = tmp_path / "bad.csv"
    path.write_text(buffer.getvalue())

    items = _rows([path])
    assert [(type(i).__name__, i.line) for i in items] == [
        ("Row", 2),
        ("BadRow", 5),
        ("BadRow", 6),
        ("BadRow", 7),
        ("BadRow", 8),
        ("BadRow", 9),
        ("BadRow", 10),
        ("BadRow", 11),
        ("BadRow", 12),
        ("BadRow", 14),
        ("Row", 15),
    ]
    bad = {i.line: i for i in items if isinstance(i, BadRow)}
    assert bad[5].error == "expected 12 fields, got 9" and bad[5].fields == tuple(_v4_row("0000000000000002")[:9])
    assert bad[5].path == str(path) and bad[5].list_index == 0 and bad[5].image_id == "0000000000000002"
    assert bad[6].reason is Reason.BAD_ID and bad[6].image_id is None and "../etc/passwd" in bad[6].error
    assert "OriginalSize" in bad[7].error and bad[7].image_id == "0000000000000003"
    assert "OriginalMD5" in bad[8].error and "OriginalMD5" in bad[9].error
    assert "Rotation" in bad[10].error and "Rotation" in bad[14].error
    assert "OriginalSize" in bad[11].error
    assert bad[12].error == "expected 12 fields, got 13" and bad[12].image_id == "0000000000000008"
    assert all(b.reason is Reason.MALFORMED_ROW for line, b in bad.items() if line != 6)
    assert count_rows([str(path)]) == len(items)


def test_unterminated_quote_and_huge_field_do_not_stop_the_run(tmp_path: Path) -> None:
    lines = [",".join(V4_COLUMNS), ",".join(_v4_row("0000000000000001"))]
    lines.append(",".join(_v4_row("0000000000000002", Title='"' + "x" * 200_000)))  # field over csv's limit
    lines.append(",".join(_v4_row("0000000000000003")))
    path = tmp_path / "huge.csv"
    path.write_text("\n".join(lines) + "\n")
    items = _rows([path])
    assert isinstance(items[0], Row) and items[0].image_id == "0000000000000001"
    assert any(isinstance(i, BadRow) and i.line == 3 for i in items)


@pytest.mark.parametrize("image_id", ["../etc", "a/b", ".", "", "..", "-rf", "a b", "a\\b", "é" * 16])
def test_unsafe_ids_become_bad_rows(tmp_path: Path, image_id: str) -> None:
    oi = _write_csv(tmp_path / "oi.csv", V4_COLUMNS, [_v4_row(image_id), _v4_row("0000000000000001")])
    items = _rows([oi])
    assert isinstance(items[0], BadRow) and items[0].reason is Reason.BAD_ID and items[0].line == 2
    assert isinstance(items[1], Row)
    ids = _write_csv(tmp_path / "ids.csv", ["ImageID"], [[image_id], ["0000000000000001"]])
    items = _rows([ids])
    assert isinstance(items[0], BadRow) and items[0].reason is Reason.BAD_ID and items[0].line == 2
    assert isinstance(items[1], Row)
    assert not is_safe_image_id(image_id)


def test_is_safe_image_id() -> None:
    for ok in ("000002b66c9c498e", "a", "A_b-c", "_x", "9" * 128):
        assert is_safe_image_id(ok), ok
    for bad in ("../etc", "a/b", ".", "", "-rf", "a" * 129, "a\n", "abc\x00", "ä", "a.jpg", "con:", " a"):
        assert not is_safe_image_id(bad), bad
    assert not is_safe_image_id(None)  # type: ignore[arg-type]


def test_md5_b64_to_hex() -> None:
    # Example from the Open Images README, decoded independently.
    assert md5_b64_to_hex("0Sad+xMj2ttXM1U8meEJ0A==") == "d1269dfb1323dadb5733553c99e109d0"
    invalid = (
        "",
        "0Sad+xMj2ttXM1U8meEJ0A=",
        "0Sad+xMj2ttXM1U8meEJ0A",
        "0Sad+xMj2ttXM1U8meEJ0B==",  # non-canonical: unused bits set
        "0Sad-xMj2ttXM1U8meEJ0A==",  # url-safe alphabet
        "d1269dfb1323dadb5733553c99e109d0",  # hex, not base64
        "AAAA",
        "0Sad+xMj2ttXM1U8meEJ0A==\n",
    )
    for bad in invalid:
        with pytest.raises(ValueError):
            md5_b64_to_hex(bad)


def test_rows_are_frozen_dataclasses(samples: Path) -> None:
    row = _good(_rows([samples / "test" / "images.csv"], limit=1))[0]
    assert dataclasses.replace(row) == row == Row(**dataclasses.asdict(row))
    assert hash(row) == hash(Row(**dataclasses.asdict(row)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.image_id = "x"  # type: ignore[misc]


# -- lists that cannot be read -----------------------------------------------------------


def test_list_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 64)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("ImageID,Título\n".encode("latin-1"))
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    only_comments = tmp_path / "comments.txt"
    only_comments.write_text("# nothing here\n\n")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("name,age\nbob,3\n")
    broken_gz = tmp_path / "broken.csv.gz"
    broken_gz.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    old_mac = tmp_path / "old-mac.csv"
    old_mac.write_bytes(b"ImageID,OriginalURL\r0000000000000001,https://example.com/a.jpg\r")
    jpeg = tmp_path / "photo.csv"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    cases = {
        tmp_path / "missing.csv": "no such file",
        tmp_path: "directory",
        garbage: "binary",
        latin1: "UTF-8",
        empty: "empty",
        only_comments: "empty",
        unknown: "unknown list format",
        broken_gz: "gzip",
        jpeg: "JPEG",
        old_mac: "not CSV",
    }
    for path, message in cases.items():
        with pytest.raises(ListError, match=message) as caught:
            list_info(str(path))
        text = str(caught.value)
        assert "\n" not in text and str(path) in text


def test_iter_rows_checks_every_list_before_the_first_row(samples: Path, tmp_path: Path) -> None:
    paths = [str(samples / "train" / "images.csv"), str(tmp_path / "missing.csv")]
    with pytest.raises(ListError, match="missing.csv: no such file"):
        iter_rows(paths)  # raised at the call, before anything was dispatched
    with pytest.raises(ListError):
        count_rows(paths)
    with pytest.raises(ListError, match="subset"):
        iter_rows(paths[:1], subset="holdout")
    with pytest.raises(ListError, match="limit"):
        iter_rows(paths[:1], limit=-1)


def test_truncated_gzip_raises_list_error_after_its_rows(tmp_path: Path) -> None:
    rows = [_v4_row(f"{i:016x}", Title=f"title {i} " * 8) for i in range(5000)]
    whole = _write_csv(tmp_path / "whole.csv.gz", V4_COLUMNS, rows, gz=True)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) * 2 // 3])
    seen = 0
    with pytest.raises(ListError, match="cut.csv.gz: unreadable after line"):
        for item in iter_rows([str(cut)]):
            assert isinstance(item, Row)
            seen += 1
    assert 0 < seen < 5000
    with pytest.raises(ListError, match="cut.csv.gz: unreadable"):
        count_rows([str(cut)])


# -- scale ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_million_row_list_streams_in_constant_memory(tmp_path: Path) -> None:
    rows_total = 1_000_000
    path = tmp_path / "big.csv"
    url = "https://c1.staticflickr.com/5/4129/5215831864_46f356962f_o.jpg"
    with open(path, "w", newline="") as f:
        f.write("ImageID,Subset,OriginalURL,OriginalSize,OriginalMD5,Rotation\r\n")
        f.writelines(
            f"{i:016x},{'train' if i % 10 else 'validation'},{url},{i},0Sad+xMj2ttXM1U8meEJ0A==,0.0\r\n"
            for i in range(rows_total)
        )
    process = psutil.Process()
    started = time.monotonic()
    baseline = peak = process.memory_info().rss
    seen = 0
    last: Row | BadRow | None = None
    for seen, last in enumerate(iter_rows([str(path)]), 1):
        if seen % 50_000 == 1:
            peak = max(peak, process.memory_info().rss)
    elapsed = time.monotonic() - started
    assert seen == rows_total
    assert isinstance(last, Row) and last.line == rows_total + 1 and last.original_size == rows_total - 1
    growth_mib = (peak - baseline) / 2**20
    # Holding the rows would take hundreds of MiB; streaming stays flat.
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB while streaming"
    rate = rows_total / elapsed
    print(f"streamed {rows_total} rows in {elapsed:.1f} s ({rate:,.0f} rows/s), RSS growth {growth_mib:.1f} MiB")
    assert count_rows([str(path)]) == rows_total
