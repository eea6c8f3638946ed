"""The annotations database: one schema for SQLite and PostgreSQL.

``oidl-engine db import`` fills it, ``select`` and ``export`` query it, and ``run
--annotations`` attaches its rows to every sample. Columns are snake_case and NULL where a
release has no such column. Coordinates stay normalised to [0, 1] as Open Images gives them
(relative to the image as annotators saw it, i.e. after ``Rotation``).

Never name a column ``xmin``/``xmax``: they are system columns in PostgreSQL and a
``CREATE TABLE`` with them fails (hence ``x_min``/``x_max``).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

#: logical column types; each backend maps them to its own
TEXT, REAL, INT, BIGINT = "text", "real", "int", "bigint"
_TYPES = {
    "sqlite": {TEXT: "TEXT", REAL: "REAL", INT: "INTEGER", BIGINT: "INTEGER"},
    # float4 keeps the 6-7 significant digits the CSVs carry at half the size of float8
    "postgres": {TEXT: "text", REAL: "real", INT: "integer", BIGINT: "bigint"},
}

#: the canonical split names (v7 point-label files say ``val``)
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]  # (name, logical type)
    primary_key: tuple[str, ...] = ()
    #: indexed after the bulk load (each a tuple of columns)
    indexes: tuple[tuple[str, ...], ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)


def _cols(spec: str) -> tuple[tuple[str, str], ...]:
    """``"a:text b:real"`` -> ``(("a", TEXT), ("b", REAL))``."""
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append((name, kind))
    return tuple(out)


_BOX = "x_min:real x_max:real y_min:real y_max:real"
_FLAGS = "is_occluded:int is_truncated:int is_group_of:int is_depiction:int is_inside:int"
_CLICKS = " ".join(f"xclick{i}x:real" for i in range(1, 5)) + " " + " ".join(f"xclick{i}y:real" for i in range(1, 5))

TABLES: tuple[Table, ...] = (
    # --- classes -------------------------------------------------------------------------
    # boxable / trainable / segmentable: 1 or 0 where the release has the list, else NULL
    Table("classes", _cols("mid:text name:text boxable:int trainable:int segmentable:int"), ("mid",),
          indexes=(("name",),)),
    # relation: 'subcategory' or 'part' (bbox_labels_600_hierarchy.json)
    Table("class_edges", _cols("parent:text child:text relation:text"), ("parent", "child", "relation"),
          indexes=(("child",),)),
    Table("attributes", _cols("mid:text name:text"), ("mid",)),  # oidv6-attributes-description.csv
    Table("relationship_descriptions", _cols("label:text name:text"), ("label",)),
    Table("relationship_triplets", _cols("mid1:text mid2:text relationship:text"), ("mid1", "mid2", "relationship")),
    # --- images --------------------------------------------------------------------------
    # one row per image even when several lists name it; split from the list's Subset column
    # (or its file name); rotation NULL for v1-v3 lists
    Table(
        "images",
        _cols(
            "image_id:text split:text original_url:text original_landing_url:text license:text "
            "author_profile_url:text author:text title:text original_size:int original_md5:text "
            "thumbnail_300k_url:text rotation:real"
        ),
        ("image_id",),
        indexes=(("split",),),
    ),
    # --- annotations (no primary key: bulk-loaded, indexed afterwards) --------------------
    # (mid, image_id) covers "which images have class X" without touching the table: the
    # images of the most frequent class of 3M boxes in milliseconds instead of seconds
    # kind: 'human' (verified; confidence 0 = verified absent, 1 = present) or 'machine'
    Table("image_labels", _cols("image_id:text split:text source:text mid:text confidence:real kind:text file_id:int"),
          indexes=(("image_id",), ("mid", "image_id"))),
    Table("boxes", _cols(f"image_id:text split:text source:text mid:text confidence:real {_BOX} {_FLAGS} {_CLICKS} file_id:int"),
          indexes=(("image_id",), ("mid", "image_id"))),
    # mask_zip: the zip (relative to the metadata directory) holding mask_path
    Table(
        "segmentations",
        _cols(
            "image_id:text split:text mid:text box_id:text mask_path:text mask_zip:text box_x_min:real "
            "box_x_max:real box_y_min:real box_y_max:real predicted_iou:real clicks:text file_id:int"
        ),
        indexes=(("image_id",), ("mid", "image_id")),
    ),
    Table(
        "relationships",
        _cols(
            "image_id:text split:text mid1:text mid2:text x_min1:real x_max1:real y_min1:real y_max1:real "
            "x_min2:real x_max2:real y_min2:real y_max2:real relationship:text file_id:int"
        ),
        indexes=(("image_id",), ("mid1",), ("mid2",)),
    ),
    # estimated_yes_no: 'yes' | 'no' | 'unsure'
    Table(
        "points",
        _cols(
            "image_id:text split:text x:real y:real mid:text estimated_yes_no:text source:text yes_votes:int "
            "no_votes:int unsure_votes:int text_label:text file_id:int"
        ),
        indexes=(("image_id",), ("mid", "image_id")),
    ),
    # localized narratives; timed_caption and traces as JSON text
    Table(
        "narratives",
        _cols(
            "image_id:text split:text dataset_id:text annotator_id:text caption:text timed_caption:text "
            "traces:text voice_recording:text file_id:int"
        ),
        indexes=(("image_id",),),
    ),
    # every MID named by a class list, per list ('boxable', 'trainable', 'segmentable',
    # 'bbox_trainable', 'all'); classes.<flag> is 1 when the newest list of that name (highest
    # rank = release) holds the MID, 0 when it does not, NULL when no such list was imported
    Table("class_lists", _cols("mid:text list:text rank:int file_id:int"), ("mid", "list", "file_id")),
    # --- bookkeeping ---------------------------------------------------------------------
    # one row per imported file: re-running the import skips files whose size and mtime match.
    # file_id tags the annotation rows a file loaded (so a changed file is replaced, never
    # doubled); slot and rank say which files are versions of the same data (the newest wins).
    Table(
        "imports",
        _cols("path:text kind:text size:bigint mtime_ns:bigint rows:int skipped:int imported_at:real file_id:int slot:text rank:int"),
        ("path",),
    ),
    Table("meta", _cols("key:text value:text"), ("key",)),
)

BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}
ANNOTATION_TABLES = ("image_labels", "boxes", "segmentations", "relationships", "points", "narratives")


def create_table_sql(table: Table, backend: str) -> str:
    types = _TYPES[backend]
    cols = [f"{name} {types[kind]}" for name, kind in table.columns]
    if table.primary_key:
        cols.append(f"PRIMARY KEY ({', '.join(table.primary_key)})")
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(cols)})"


def index_sql(table: Table) -> list[str]:
    """``CREATE INDEX IF NOT EXISTS`` statements; same text for both backends."""
    return [
        f"CREATE INDEX IF NOT EXISTS {table.name}_{'_'.join(cols)}_idx ON {table.name} ({', '.join(cols)})"
        for cols in table.indexes
    ]
