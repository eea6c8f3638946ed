"""Parquet shards (pyarrow): one row per image, annotations as nested list-of-struct columns.

Columns: ``image_id``, ``image`` (bytes), ``format``, ``width``, ``height`` (of the encoded
image), ``source_width``, ``source_height``, ``rotation``, ``rotation_applied``, ``url``,
``md5``, then the run's list columns (strings, as in the list), then with ``--annotations``
``boxes``, ``labels``, ``segmentations`` (with ``mask``: PNG bytes), ``relationships`` and
``points``, each a ``list<struct<...>>`` with the fields of :func:`annotations.fields_of`.

Rows are buffered only up to one row group (``ROW_GROUP_ROWS`` rows or
``ROW_GROUP_BYTES``, whichever first), so memory does not grow with the shard and a reader
can stream the file one row group at a time. Images are stored uncompressed (they are
already compressed); the other columns use Snappy.
"""

from __future__ import annotations

from typing import Any, Sequence

from .annotations import KINDS, fields_of
from .base import Sample, ShardWriter

ROW_GROUP_ROWS = 512
ROW_GROUP_BYTES = 64 * 1024 * 1024

_FIXED = ("image_id", "image", "format", "width", "height", "source_width", "source_height", "rotation",
          "rotation_applied", "url", "md5")


def _pa():  # noqa: ANN202
    import pyarrow

    return pyarrow


def list_column_names(list_columns: Sequence[str]) -> list[tuple[str, str]]:
    """(parquet column, list column): a list column named like a fixed one gets a ``list_`` prefix."""
    taken = set(_FIXED) | set(KINDS)
    return [(f"list_{c}" if c in taken else c, c) for c in list_columns]


def schema(list_columns: Sequence[str], annotations: bool) -> Any:
    pa = _pa()
    types = {"text": pa.string(), "real": pa.float64(), "int": pa.int64()}
    fields = [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("source_width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("rotation", pa.float64()),
        pa.field("rotation_applied", pa.bool_()),
        pa.field("url", pa.string()),
        pa.field("md5", pa.string()),
    ]
    fields += [pa.field(name, pa.string()) for name, _ in list_column_names(list_columns)]
    if annotations:
        for kind in KINDS:
            sub = [pa.field(c, types[t]) for c, t in fields_of(kind)]
            if kind == "segmentations":
                sub.append(pa.field("mask", pa.binary()))
            fields.append(pa.field(kind, pa.list_(pa.struct(sub))))
    return pa.schema(fields)


class ParquetShard(ShardWriter):
    format_name = "parquet"

    def __init__(self, path, durable: bool = True, list_columns: Sequence[str] = (), annotations: bool = False) -> None:  # noqa: ANN001
        super().__init__(path, durable)
        import pyarrow.parquet as pq

        self.schema = schema(list_columns, annotations)
        self.list_cols = list_column_names(list_columns)
        self.annotations = annotations
        self.rows: list[dict[str, Any]] = []
        self.buffered = 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed in finish/abort
        compression = {f.name: ("NONE" if f.name == "image" else "SNAPPY") for f in self.schema}
        self.writer = pq.ParquetWriter(self.file, self.schema, compression=compression, use_dictionary=False,
                                       write_statistics=["image_id", "width", "height"])

    def add(self, s: Sample) -> int:
        d = s.doc
        row: dict[str, Any] = {k: d.get(k) for k in _FIXED if k not in ("image", "image_id", "format", "width", "height")}
        row.update(image_id=s.image_id, image=s.data(), format=s.format, width=s.width, height=s.height)
        lst = d.get("list") or {}
        for name, col in self.list_cols:
            row[name] = lst.get(col)
        if self.annotations:
            ann = s.annotations
            for kind in KINDS:
                row[kind] = list(getattr(ann, kind)) if ann else []
            if ann:
                row["segmentations"] = [dict(x, mask=m) for x, m in zip(ann.segmentations, ann.masks)]
        self.rows.append(row)
        self.buffered += s.nbytes
        at = self.samples
        self.samples += 1
        if len(self.rows) >= ROW_GROUP_ROWS or self.buffered >= ROW_GROUP_BYTES:
            self._flush()
        self.nbytes = self.file.tell() + self.buffered
        return at

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(_pa().Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []
            self.buffered = 0

    def finish(self) -> None:
        import os

        self._flush()
        self.writer.close()
        self.file.flush()
        if self.durable:
            os.fsync(self.file.fileno())
        self.nbytes = self.file.tell()
        self.file.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.file.close()
