"""engine.overlay: Open Images boxes mapped into a written variant, and the sidecar lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.overlay import BoxLookup, display_box

BOX = {"x_min": 0.25, "x_max": 0.75, "y_min": 0.1, "y_max": 0.5}


def doc(w: int, h: int, sw: int, sh: int, rotation: float | None = None, applied: bool = False) -> dict:
    return {"width": w, "height": h, "source_width": sw, "source_height": sh, "rotation": rotation,
            "rotation_applied": applied}


@pytest.mark.parametrize(
    ("d", "mode", "want"),
    [
        (doc(128, 64, 400, 200), "shrink", (0.25, 0.1, 0.75, 0.5)),
        (doc(100, 100, 400, 200), "fill-distort", (0.25, 0.1, 0.75, 0.5)),
        # 400x200 covers 100x100 at scale 0.5: 200x100, 50 px cut on each side
        (doc(100, 100, 400, 200), "fill-crop", (0.0, 0.1, 1.0, 0.5)),
        # 400x200 fits 100x100 at 0.25: 100x50, 25 px of padding above and below
        (doc(100, 100, 400, 200), "pad", (0.25, 0.30, 0.75, 0.50)),
        # not applied: a 90° turn maps (x, y) to (y, 1 - x) in the stored image
        (doc(128, 64, 400, 200, 90), "shrink", (0.1, 0.25, 0.5, 0.75)),
        (doc(128, 64, 400, 200, 180), "shrink", (0.25, 0.5, 0.75, 0.9)),
        (doc(128, 64, 400, 200, 270), "shrink", (0.5, 0.25, 0.9, 0.75)),
        # applied: the written frame is upright (200x400 here): covers 100x100 at 0.5, 100x200,
        # 50 px cut above and below
        (doc(100, 100, 400, 200, 90, True), "fill-crop", (0.25, 0.0, 0.75, 0.5)),
    ],
)
def test_display_box(d: dict, mode: str, want: tuple) -> None:
    assert display_box(BOX, d, mode) == pytest.approx(want)


def test_box_cropped_away_is_dropped() -> None:
    left = {"x_min": 0.0, "x_max": 0.1, "y_min": 0.2, "y_max": 0.4}
    assert display_box(left, doc(100, 100, 400, 200), "fill-crop") is None


def test_lookup_reads_sidecars_with_notes(tmp_path: Path) -> None:
    rel = "128/abc/abc0000000000001.jpg"
    (tmp_path / "128/abc").mkdir(parents=True)
    side = tmp_path / "128/abc/abc0000000000001.json"
    side.write_text(json.dumps({**doc(128, 64, 400, 200), "variant": "128",
                                "annotations": {"boxes": [{**BOX, "mid": "/m/01g317", "name": "Person"}]}}))
    look = BoxLookup(tmp_path, {"128": "shrink"})
    ans = look.boxes("abc0000000000001", rel)
    assert ans["boxes"] == [{"mid": "/m/01g317", "name": "Person", "box": [0.25, 0.1, 0.75, 0.5], "group_of": False}]
    assert "note" not in ans
    side.unlink()
    assert look.boxes("abc0000000000001", rel) == ans  # cached
    missing = look.boxes("abc0000000000002", "128/abc/abc0000000000002.jpg")
    assert missing["boxes"] == [] and "no annotations file" in missing["note"]
    bad = tmp_path / "128/abc/abc0000000000003.json"
    bad.write_text("{not json")
    assert "unreadable" in look.boxes("abc0000000000003", "128/abc/abc0000000000003.jpg")["note"]
