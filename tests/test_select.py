"""Issue 10 `oidl-engine select`: every option against a brute-force computation over the
same synthetic rows (tests/oi_synth.py), on a real SQLite file (and, in test_select_pg,
a real PostgreSQL)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import oi_synth
from conftest import run_cli
from engine import inputs
from engine.meta.select import LIST_COLUMNS, sample_key

CAT, DOG, ANIMAL, VEHICLE, CAR, WHEEL, PERSON, FACE = (
    "/m/01yrx", "/m/0bt9lr", "/m/0jbk", "/m/07yv9", "/m/0k4j", "/m/083wq", "/m/01g317", "/m/0dzct"
)
DUCKS = "/m/0dbvp"
DOGS = {DOG, "/m/0dog2"}  # the name "Dog" stands for both classes whose name it is, in any case


@pytest.fixture(scope="module")
def ds() -> oi_synth.Dataset:
    return oi_synth.make_dataset()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def target(request, ds: oi_synth.Dataset, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: ANN001
    """The same rows in a SQLite file and in a real PostgreSQL server: the same SQL must give the same answers."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("selectdb") / "openimages.sqlite"
        oi_synth.load_sqlite(path, ds)
        return str(path)
    psycopg = pytest.importorskip("psycopg")
    url = oi_synth.postgres_server(request).new_database("select")
    with psycopg.connect(url) as conn:
        oi_synth.load_postgres(conn, ds)
    return url


def select(target: str, tmp: Path, *args: str) -> list[list[str]]:
    out = tmp / "sel.csv"
    out.unlink(missing_ok=True)
    assert oi_synth.cli_main(["select", "--db", target, "--out", str(out), *args]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == LIST_COLUMNS
    return rows[1:]


def ids(rows: list[list[str]]) -> list[str]:
    return [r[0] for r in rows]


# (CLI args, requested classes as MIDs, brute-force keyword arguments)
CASES = [
    (["--class", "Cat"], [{CAT}], {}),
    (["--class", "cAt", "--class", "/m/0bt9lr"], [{CAT}, {DOG}], {}),
    (["--class", "Cat", "--class", "Dog", "--match", "all", "--label-types", "boxes,labels"], [{CAT}, DOGS],
     {"kinds": ("boxes", "labels"), "match": "all"}),
    (["--class", "Animal", "--subclasses"], [oi_synth.descendants(oi_synth.Dataset(edges=oi_synth.EDGES), ANIMAL)], {}),
    (["--class", "Vehicle", "--subclasses"], [{VEHICLE, CAR}], {}),  # the Wheel part is not a vehicle
    (["--class", "Person", "--subclasses"], [{PERSON}], {}),  # nor is a face a person
    (["--class", "ducks, GEESE and swans", "--subclasses"], [{DUCKS, "/m/09ddx"}], {}),
    (["--class", "Car", "--split", "validation", "--split", "test"], [{CAR}], {"splits": ("validation", "test")}),
    (["--class", "/m/0bt9lr", "--exclude-group-of", "--exclude-occluded"], [{DOG}], {"exclude": ("group_of", "occluded")}),
    (["--class", "Bird", "--exclude-depiction", "--exclude-truncated"], [{"/m/015p6"}],
     {"exclude": ("depiction", "truncated")}),
    (["--class", "Kitten", "--label-types", "labels"], [{"/m/0kitt"}], {"kinds": ("labels",)}),
    (["--class", "Cat", "--label-types", "machine-labels", "--min-confidence", "0.7"], [{CAT}],
     {"kinds": ("machine-labels",), "min_conf": 0.7}),
    (["--class", "Cat", "--class", "Person", "--label-types", "machine-labels"], [{CAT}, {PERSON}],
     {"kinds": ("machine-labels",)}),
    (["--class", "Car", "--label-types", "segmentations"], [{CAR}], {"kinds": ("segmentations",)}),
    (["--class", "Dog", "--class", "Wheel", "--label-types", "relationships"], [DOGS, {WHEEL}],
     {"kinds": ("relationships",)}),
    (["--class", "Person", "--label-types", "points"], [{PERSON}], {"kinds": ("points",)}),
    (["--class", "Animal", "--subclasses", "--class", "Vehicle", "--match", "all",
      "--label-types", "boxes,labels,machine-labels,segmentations,relationships,points"],
     [oi_synth.descendants(oi_synth.Dataset(edges=oi_synth.EDGES), ANIMAL), {VEHICLE, CAR}],  # --subclasses: both
     {"kinds": ("boxes", "labels", "machine-labels", "segmentations", "relationships", "points"), "match": "all"}),
]


@pytest.mark.parametrize("args,groups,kw", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_select_matches_brute_force(ds, target, tmp_path, args, groups, kw) -> None:  # noqa: ANN001
    rows = select(target, tmp_path, *args)
    want = oi_synth.brute_select(ds, groups, **kw)
    assert want, "the case selects nothing: it would prove little"
    assert ids(rows) == sorted(want)  # ImageID order without --limit
    by_id = {r[0]: r for r in ds.images}
    for r in rows:  # the release's own columns, every one
        img = by_id[r[0]]
        assert r[:11] == ["" if v is None else str(v) for v in img[:11]]
        assert r[11] == ("" if img[11] is None else repr(img[11]))


def test_limit_seed_ranks_images_showing_more_classes_first(ds, target, tmp_path) -> None:  # noqa: ANN001
    args = ["--class", "Cat", "--class", "/m/0bt9lr", "--class", "Person", "--label-types", "boxes,labels,machine-labels",
            "--min-confidence", "0"]
    full = oi_synth.brute_select(ds, [{CAT}, {DOG}, {PERSON}], ("boxes", "labels", "machine-labels"), min_conf=0.0)
    several = sum(1 for n in full.values() if n > 1)
    assert several >= 5 and len(full) - several > 30
    limit = str(several + 10)  # the cut falls among the many images showing one class
    first = ids(select(target, tmp_path, *args, "--limit", limit, "--seed", "7"))
    again = ids(select(target, tmp_path, *args, "--limit", limit, "--seed", "7"))
    other = ids(select(target, tmp_path, *args, "--limit", limit, "--seed", "8"))
    assert first == again  # reproducible
    assert len(first) == int(limit) and set(first) <= set(full)
    assert set(other) != set(first)  # the seed matters
    counts = [full[i] for i in first]
    assert counts == sorted(counts, reverse=True)  # more classes first
    cut = counts[-1]
    assert {i for i, n in full.items() if n > cut} <= set(first)  # every image showing more made it in
    # within a class count the order is the seeded random one
    assert first == sorted(first, key=lambda i: (-full[i], sample_key(7, i)))
    assert len(ids(select(target, tmp_path, *args, "--limit", "100000"))) == len(full)


def test_count_prints_matches_per_class_and_split(ds, target, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "never.csv"
    assert oi_synth.cli_main(["select", "--db", target, "--class", "Cat", "--class", "Ducks, geese and swans", "--count",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    lines = {ln.split("  ")[0].strip(): ln.split() for ln in text.splitlines()}
    split_of = {r[0]: r[1] for r in ds.images}
    for name, mid in (("Cat", CAT), ("Ducks, geese and swans", DUCKS)):
        sel = oi_synth.brute_select(ds, [{mid}])
        want = [sum(1 for i in sel if split_of[i] == s) for s in oi_synth.SPLITS]
        assert [int(x) for x in lines[name][-4:]] == [*want, sum(want)], text
    both = oi_synth.brute_select(ds, [{CAT}, {DUCKS}])
    assert int(lines["images selected"][-1]) == len(both)


def test_classes_file_names_with_commas(ds, target, tmp_path) -> None:  # noqa: ANN001
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\nducks, geese and swans\n\n/m/01yrx\n", encoding="utf-8")
    rows = select(target, tmp_path, "--classes-file", str(f))
    assert ids(rows) == sorted(oi_synth.brute_select(ds, [{DUCKS}, {CAT}]))


def test_a_name_shared_by_two_classes_takes_both(ds, target, tmp_path) -> None:  # noqa: ANN001
    rows = select(target, tmp_path, "--class", "DOG", "--label-types", "labels,boxes")
    assert ids(rows) == sorted(oi_synth.brute_select(ds, [DOGS], ("labels", "boxes")))


def test_unknown_class_exits_2_with_the_nearest_names(target, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "x.csv"
    p = run_cli(["select", "--db", target, "--class", "Catt", "--out", out])  # the real command line once
    assert p.returncode == 2, p.stderr
    assert "did you mean 'Cat'?" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()

    def fails(*args: str) -> tuple[int, str]:
        """In-process: an exception here is the traceback a user would see."""
        try:
            code = oi_synth.cli_main(["select", "--out", str(out), *args])
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
        return code, capsys.readouterr().err

    code, err = fails("--db", target, "--class", "geese")
    assert code == 2 and "'Ducks, geese and swans'" in err
    code, err = fails("--db", target, "--class", "Cat", "--label-types", "boxes,nope")
    assert code == 2 and "nope" in err
    code, err = fails("--db", str(tmp_path / "missing.sqlite"), "--class", "Cat")
    assert code == 1 and "db import" in err
    code, err = fails("--db", "postgresql://nobody@127.0.0.1:1/none", "--class", "Cat")
    assert code == 1 and "cannot connect" in err
    assert not out.exists()


def test_output_is_a_list_the_engine_reads(ds, target, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "sel.csv.gz"
    assert oi_synth.cli_main(["select", "--db", target, "--class", "Animal", "--subclasses", "--out", str(out)]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    info = inputs.list_info(str(out))
    assert info.kind.value == "openimages" and tuple(info.columns) == LIST_COLUMNS
    rows = [r for r in inputs.iter_rows([str(out)]) if isinstance(r, inputs.Row)]
    want = oi_synth.brute_select(ds, [oi_synth.descendants(ds, ANIMAL)])
    assert [r.image_id for r in rows] == sorted(want)
    by_id = {r[0]: r for r in ds.images}
    for r in rows:
        img = by_id[r.image_id]
        assert (r.subset, r.original_url, r.thumbnail_url, r.original_size, r.rotation) == (
            img[1], img[2], img[10], img[8], img[11])
