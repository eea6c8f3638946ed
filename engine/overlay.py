"""Boxes over the web UI's gallery (``run --annotations … --web-port P``).

The gallery shows each new image's smallest variant; with ``--annotations`` the web server
answers ``/boxes/<ImageID>`` with that image's boxes mapped into the *displayed* file, and the
page draws them with their class names.

Where the boxes come from: ``--format files --annotations`` writes ``<ImageID>.json`` beside
every image (sizes, ``rotation``, ``rotation_applied`` and the database's annotations for that
image, looked up by the writer in batches). The monitor reads that small file when the browser
asks — the first time only, then from a bounded cache — instead of querying the annotations
database itself: it stays a reader of what the run already produced, adds no load to the
database and no connection (no psycopg in the monitor for a ``postgresql://`` target), and
the boxes are exactly the ones the run attached. Anything missing (no sidecar, a sidecar that
does not parse, an image that left the board) is an answer with a ``note``, never an error.

Geometry (Open Images boxes are normalised to the whole upright image, README "Annotations"):
without ``--apply-rotation`` the stored pixels are not upright, so points go through the
``Rotation`` mapping first; a ``fill-crop`` variant then crops the centre of the scaled image
and a ``pad`` variant places the fitted image in the centre of its box (libvips
``gravity centre``); ``shrink`` and ``fill-distort`` keep the frame.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

#: sidecars kept in memory (a gallery shows 40; the board lists the last 100)
CACHE_ENTRIES = 256
#: a sidecar larger than this is not read (masks are base64 inside; boxes alone are small)
MAX_SIDECAR_BYTES = 8 * 1024 * 1024
#: boxes sent per image (Open Images has images with hundreds of group-of boxes)
MAX_BOXES = 200


def _quarter(rotation: float | None) -> int:
    """Open Images ``Rotation`` (degrees, clockwise, empty on v1-v3) as 0, 90, 180 or 270."""
    return int(round((rotation or 0) / 90.0)) * 90 % 360


def to_stored(x: float, y: float, rotation: float | None) -> tuple[float, float]:
    """A normalised point of the upright image -> the same point in the stored (unrotated) one."""
    r = _quarter(rotation)
    return {0: (x, y), 90: (y, 1 - x), 180: (1 - x, 1 - y), 270: (1 - y, x)}[r]


def display_box(box: Mapping[str, Any], doc: Mapping[str, Any], mode: str) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) of one Open Images box, normalised to the written image ``doc`` describes.

    ``mode`` is the variant's resize mode; None when the box is outside the written frame.
    """
    x0, y0, x1, y1 = (float(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    rot = doc.get("rotation")
    r = _quarter(rot)
    sw, sh = int(doc.get("source_width") or 0), int(doc.get("source_height") or 0)
    if doc.get("rotation_applied"):
        fw, fh = (sh, sw) if r in (90, 270) else (sw, sh)  # the written frame is upright
    else:
        (ax, ay), (bx, by) = to_stored(x0, y0, rot), to_stored(x1, y1, rot)
        x0, y0, x1, y1 = min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)
        fw, fh = sw, sh
    w, h = int(doc.get("width") or 0), int(doc.get("height") or 0)
    if mode in ("fill-crop", "pad") and fw > 0 and fh > 0 and w > 0 and h > 0:
        if mode == "fill-crop":  # scale to cover, crop the centre
            s = max(w / fw, h / fh)
            ox, oy = (fw * s - w) / 2, (fh * s - h) / 2
            x0, x1 = [(x * fw * s - ox) / w for x in (x0, x1)]
            y0, y1 = [(y * fh * s - oy) / h for y in (y0, y1)]
        else:  # fit inside (never upscale), then centred in the box
            s = min(w / fw, h / fh, 1.0)
            iw, ih = max(1, round(fw * s)), max(1, round(fh * s))
            ox, oy = (w - iw) // 2, (h - ih) // 2
            x0, x1 = [(ox + x * iw) / w for x in (x0, x1)]
            y0, y1 = [(oy + y * ih) / h for y in (y0, y1)]
    x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in (x0, y0, x1, y1))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


class BoxLookup:
    """``/boxes/<ImageID>`` answers from the sidecars of gallery images, with a bounded cache."""

    def __init__(self, out_dir: Path, modes: Mapping[str, str]) -> None:
        self.out_dir = out_dir
        self.modes = dict(modes)  # variant name -> resize mode
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self.lock = threading.Lock()

    def _answer(self, image_id: str, rel: str) -> dict:
        sidecar = self.out_dir / Path(rel).with_suffix(".json")
        try:
            if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
                return {"image_id": image_id, "boxes": [], "note": "annotations file too large to show"}
            doc = json.loads(sidecar.read_bytes())
            boxes = doc["annotations"]["boxes"]
        except FileNotFoundError:
            return {"image_id": image_id, "boxes": [], "note": "no annotations file beside this image"}
        except (OSError, ValueError, KeyError, TypeError) as e:
            return {"image_id": image_id, "boxes": [], "note": f"annotations file unreadable: {type(e).__name__}"}
        mode = self.modes.get(str(doc.get("variant")), "shrink")
        out = []
        for b in boxes[:MAX_BOXES]:
            try:
                xy = display_box(b, doc, mode)
            except (KeyError, TypeError, ValueError):
                continue  # a box without coordinates: nothing to draw
            if xy is not None:
                out.append({"mid": b.get("mid"), "name": b.get("name") or b.get("mid"), "box": [round(v, 5) for v in xy],
                            "group_of": b.get("is_group_of") == 1})
        ans = {"image_id": image_id, "width": doc.get("width"), "height": doc.get("height"), "boxes": out}
        if len(boxes) > MAX_BOXES:
            ans["note"] = f"first {MAX_BOXES} of {len(boxes)} boxes"
        return ans

    def boxes(self, image_id: str, rel: str) -> dict:
        """The boxes of a gallery image whose smallest file is ``out_dir/rel``."""
        with self.lock:
            hit = self.cache.get(image_id)
            if hit is not None:
                self.cache.move_to_end(image_id)
                return hit
        ans = self._answer(image_id, rel)
        if "note" not in ans or ans["boxes"]:  # a missing file may appear later: do not remember it
            with self.lock:
                self.cache[image_id] = ans
                while len(self.cache) > CACHE_ENTRIES:
                    self.cache.popitem(last=False)
        return ans


__all__ = ["BoxLookup", "display_box", "to_stored"]
