"""A varied synthetic Open Images annotations dataset, in Python, and loaders into the
``engine.meta.schema`` tables (SQLite file or a PostgreSQL connection).

The select tests compare every option with a brute-force computation over the same
Python rows, so the rows here are the truth.
"""

from __future__ import annotations

import random
import sqlite3

import pytest
from dataclasses import dataclass, field

from engine.meta import schema

# (mid, name, boxable)
CLASSES = [
    ("/m/0jbk", "Animal", 1),
    ("/m/01yrx", "Cat", 1),
    ("/m/0bt9lr", "Dog", 1),
    ("/m/015p6", "Bird", 1),
    ("/m/0dbvp", "Ducks, geese and swans", 1),
    ("/m/09ddx", "Duck", 1),
    ("/m/07yv9", "Vehicle", 1),
    ("/m/0k4j", "Car", 1),
    ("/m/083wq", "Wheel", 1),
    ("/m/01g317", "Person", 1),
    ("/m/0dzct", "Human face", 1),
    ("/m/0hkxq", "Broccoli", 1),
    ("/m/0kitt", "Kitten", 0),  # image labels only, not boxable
    ("/m/0dog2", "dog", 0),  # a second class whose name differs only in case
]
# (parent, child, relation)
EDGES = [
    ("/m/0bl9f", "/m/0jbk", "subcategory"),
    ("/m/0bl9f", "/m/07yv9", "subcategory"),
    ("/m/0jbk", "/m/01yrx", "subcategory"),
    ("/m/0jbk", "/m/0bt9lr", "subcategory"),
    ("/m/0jbk", "/m/015p6", "subcategory"),
    ("/m/015p6", "/m/0dbvp", "subcategory"),
    ("/m/0dbvp", "/m/09ddx", "subcategory"),
    ("/m/07yv9", "/m/0k4j", "subcategory"),
    ("/m/0k4j", "/m/083wq", "part"),
    ("/m/01g317", "/m/0dzct", "part"),
]
MIDS = [c[0] for c in CLASSES]
SPLITS = ("train", "validation", "test")


@dataclass
class Dataset:
    classes: list[tuple] = field(default_factory=list)
    edges: list[tuple] = field(default_factory=list)
    images: list[tuple] = field(default_factory=list)  # schema images columns
    image_labels: list[tuple] = field(default_factory=list)  # image_id, split, source, mid, confidence, kind
    boxes: list[tuple] = field(default_factory=list)  # schema boxes columns
    segmentations: list[tuple] = field(default_factory=list)
    relationships: list[tuple] = field(default_factory=list)
    points: list[tuple] = field(default_factory=list)

    def rows(self) -> dict[str, list[tuple]]:
        return {
            "classes": [(m, n, b, None, None) for m, n, b in self.classes],
            "class_edges": self.edges,
            "images": self.images,
            "image_labels": self.image_labels,
            "boxes": self.boxes,
            "segmentations": self.segmentations,
            "relationships": self.relationships,
            "points": self.points,
        }


def _hex16(rng: random.Random) -> str:
    return "%016x" % rng.getrandbits(64)


def image_row(image_id: str, split: str, rotation: float | None, base_url: str = "https://farm1.example.org") -> tuple:
    url = f"{base_url}/{image_id}_o.jpg"
    return (image_id, split, url, f"https://www.flickr.com/photos/x/{image_id}", "https://creativecommons.org/licenses/by/2.0/",
            "https://www.flickr.com/people/x/", "Ann, \"the\" author", f"Title, with comma {image_id[:4]}",
            1000 + int(image_id[:4], 16), "AAAAAAAAAAAAAAAAAAAAAA==", f"{base_url}/{image_id}_z.jpg", rotation)


def box_row(image_id: str, split: str, mid: str, x0: float, x1: float, y0: float, y1: float,
            occluded: int = 0, truncated: int = 0, group_of: int = 0, depiction: int = 0, inside: int = 0) -> tuple:
    return (image_id, split, "xclick", mid, 1.0, x0, x1, y0, y1, occluded, truncated, group_of, depiction, inside,
            *([None] * 8))


def make_dataset(n_images: int = 240, seed: int = 5) -> Dataset:
    rng = random.Random(seed)
    ds = Dataset(classes=list(CLASSES), edges=list(EDGES))
    ids = sorted({_hex16(rng) for _ in range(n_images)})
    for i, image_id in enumerate(ids):
        split = SPLITS[i % 3]
        rot = rng.choice([0.0, 0.0, 90.0, 180.0, 270.0, None])
        ds.images.append(image_row(image_id, split, rot))
        for _ in range(rng.randrange(0, 4)):
            x0, y0 = rng.random() * 0.6, rng.random() * 0.6
            flags = [rng.choice([0, 0, 1, -1]) for _ in range(5)]
            ds.boxes.append(box_row(image_id, split, rng.choice(MIDS[:12]), x0, x0 + 0.3, y0, y0 + 0.3, *flags))
        for _ in range(rng.randrange(0, 3)):
            ds.image_labels.append((image_id, split, "verification", rng.choice(MIDS), rng.choice([0.0, 1.0]), "human"))
        for _ in range(rng.randrange(0, 3)):
            ds.image_labels.append((image_id, split, "machine", rng.choice(MIDS), round(rng.random(), 2), "machine"))
        if rng.random() < 0.3:
            mid = rng.choice(MIDS[:12])
            ds.segmentations.append((image_id, split, mid, "abcd1234", f"{image_id}_{mid[3:]}_abcd1234.png",
                                     f"{split}-masks/{split}-masks-{image_id[0]}.zip", 0.1, 0.5, 0.1, 0.5, 0.8, None))
        if rng.random() < 0.3:
            ds.relationships.append((image_id, split, rng.choice(MIDS[:12]), rng.choice(MIDS[:12]),
                                     0.1, 0.2, 0.1, 0.2, 0.3, 0.4, 0.3, 0.4, rng.choice(["at", "on", "is"])))
        if rng.random() < 0.4:
            ds.points.append((image_id, split, 0.5, 0.5, rng.choice(MIDS), rng.choice(["yes", "no", "unsure"]),
                              "crowd", 2, 1, 0, None))
    # annotations of an image missing from the lists: never selectable (no URL to write)
    ds.boxes.append(box_row("ffffffffffffffff", "train", "/m/01yrx", 0.1, 0.2, 0.1, 0.2))
    return ds


def load_sqlite(path, ds: Dataset) -> None:  # noqa: ANN001
    conn = sqlite3.connect(str(path))
    try:
        with conn:
            _load(conn, ds, "sqlite", "?")
    finally:
        conn.close()


def load_postgres(conn, ds: Dataset) -> None:  # noqa: ANN001
    with conn.transaction():
        _load(conn, ds, "postgres", "%s")


def _load(conn, ds: Dataset, backend: str, mark: str) -> None:  # noqa: ANN001
    cur = conn.cursor()
    for table in schema.TABLES:
        cur.execute(f"DROP TABLE IF EXISTS {table.name}")
        cur.execute(schema.create_table_sql(table, backend))
    for name, rows in ds.rows().items():
        table = schema.BY_NAME[name]
        if rows:
            # the leading columns: the schema may grow columns (import bookkeeping) that stay NULL here
            cols = table.column_names[: len(rows[0])]
            cur.executemany(f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})", rows)
        for sql in schema.index_sql(table):
            cur.execute(sql)


# -- brute force ----------------------------------------------------------------------------


def descendants(ds: Dataset, mid: str) -> set[str]:
    out = {mid}
    changed = True
    while changed:
        changed = False
        for parent, child, rel in ds.edges:
            if rel == "subcategory" and parent in out and child not in out:
                out.add(child)
                changed = True
    return out


def brute_pairs(ds: Dataset, kinds, *, min_conf=0.5, exclude=()) -> set[tuple[str, str]]:  # noqa: ANN001
    """Every (image_id, mid) the label kinds say an image shows."""
    pairs = set()
    flag_pos = {"occluded": 9, "truncated": 10, "group_of": 11, "depiction": 12}
    for kind in kinds:
        if kind == "boxes":
            for b in ds.boxes:
                if all(b[flag_pos[f]] != 1 for f in exclude):
                    pairs.add((b[0], b[3]))
        elif kind == "labels":
            pairs |= {(r[0], r[3]) for r in ds.image_labels if r[5] == "human" and r[4] == 1.0}
        elif kind == "machine-labels":
            pairs |= {(r[0], r[3]) for r in ds.image_labels if r[5] == "machine" and r[4] >= min_conf}
        elif kind == "segmentations":
            pairs |= {(r[0], r[2]) for r in ds.segmentations}
        elif kind == "relationships":
            pairs |= {(r[0], r[2]) for r in ds.relationships} | {(r[0], r[3]) for r in ds.relationships}
        elif kind == "points":
            pairs |= {(r[0], r[4]) for r in ds.points if r[5] == "yes"}
    return pairs


def brute_select(ds: Dataset, groups: list[set[str]], kinds=("boxes",), *, match="any", splits=(), **kw) -> dict[str, int]:  # noqa: ANN001
    """image_id -> number of requested classes it shows, for the selected images."""
    pairs = brute_pairs(ds, kinds, **kw)
    split_of = {r[0]: r[1] for r in ds.images}
    out = {}
    for image_id, split in split_of.items():
        if splits and split not in splits:
            continue
        shown = {m for i, m in pairs if i == image_id}
        n = sum(1 for g in groups if g & shown)
        if n and (match == "any" or n == len(groups)):
            out[image_id] = n
    return out


def postgres_server(request):  # noqa: ANN001, ANN201
    """The suite's real PostgreSQL (conftest's ``postgres`` fixture, tests/pg.py)."""
    try:
        return request.getfixturevalue("postgres")
    except pytest.FixtureLookupError:
        pytest.skip("no 'postgres' fixture in this checkout")


def cli_main(argv: list[str]) -> int:
    """``engine.cli.main`` in this process, leaving logging as it found it.

    main() configures logging for a command-line process (the pyvips logger at ERROR); left
    that way, image tests later in the session would no longer see libvips warnings.
    """
    import logging

    from engine import cli

    loggers = [logging.getLogger(), logging.getLogger("pyvips")]
    saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
    try:
        return cli.main(argv)
    finally:
        for lg, level, handlers in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
