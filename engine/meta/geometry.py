"""Where an Open Images annotation lands in the pixels of a file we wrote.

Annotations are normalised to the image as the annotators saw it: the EXIF-oriented image
turned by ``Rotation`` (degrees counterclockwise; README "Image pipeline"). A file we wrote
is that image only when the run applied the rotation (``--apply-rotation``; never for
kept originals); otherwise the turn is undone here. Then the variant's mode: ``shrink``
and ``fill-distort`` scale the whole image to the file, ``fill-crop`` scales it to cover
the box and cuts the centre, ``pad`` fits it and centres it on the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..variants import Mode


def quarter_turns(rotation_deg: float | None) -> int:
    """Counterclockwise quarter turns of a ``Rotation`` value (None, NaN, or not a multiple of 90: 0)."""
    if rotation_deg is None or math.isnan(rotation_deg):
        return 0
    turns, rest = divmod(float(rotation_deg), 90.0)
    return 0 if rest else int(turns) % 4


@dataclass(frozen=True)
class Geometry:
    """Normalised annotator coordinates -> pixels of one written file."""

    turns: int  # counterclockwise quarter turns between the file's frame and the annotators' frame
    scaled_w: float  # size, in the file's pixels, of the whole (unturned) image
    scaled_h: float
    offset_x: float  # file x = u * scaled_w - offset_x (crop: > 0, pad: < 0)
    offset_y: float
    width: int  # the file's size
    height: int

    def point(self, x: float, y: float) -> tuple[float, float]:
        """One normalised annotator point -> the file's pixel coordinates (unclipped)."""
        u, v = x, y
        for _ in range(self.turns):
            # one counterclockwise turn maps (u, v) to (v, 1 - u); undo it
            u, v = 1.0 - v, u
        return u * self.scaled_w - self.offset_x, v * self.scaled_h - self.offset_y

    def box(self, x_min: float, x_max: float, y_min: float, y_max: float) -> tuple[float, float, float, float] | None:
        """(x0, y0, x1, y1) in the file's pixels, clipped to it; None when nothing of it is left."""
        ax, ay = self.point(x_min, y_min)
        bx, by = self.point(x_max, y_max)
        x0, x1 = sorted((ax, bx))
        y0, y1 = sorted((ay, by))
        x0, x1 = max(0.0, x0), min(float(self.width), x1)
        y0, y1 = max(0.0, y0), min(float(self.height), y1)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            return None
        return x0, y0, x1, y1

    def mask(self, mask):  # noqa: ANN001, ANN201 - pyvips.Image in, pyvips.Image out
        """A full-image mask in the annotators' frame -> one band of the file's size (0..255)."""
        img = mask
        if img.bands > 1:
            img = img[0]
        if self.turns:
            img = img.rot({1: "d90", 2: "d180", 3: "d270"}[self.turns])  # clockwise: undoes the turn
        sw, sh = max(1, round(self.scaled_w)), max(1, round(self.scaled_h))
        img = img.resize(sw / img.width, vscale=sh / img.height, kernel="linear")
        return img.embed(round(-self.offset_x), round(-self.offset_y), self.width, self.height, extend="black")


def geometry_for(
    mode: Mode | None,
    source_size: tuple[int, int],
    file_size: tuple[int, int],
    turns: int,
) -> Geometry:
    """The geometry of one file.

    ``mode`` is the variant's (None for a kept original: the file as downloaded, EXIF
    orientation applied by whoever reads it); ``source_size`` is the image the variant was
    made from, in the file's frame (``images.width/height`` of the state DB); ``turns`` the
    quarter turns still to undo (0 when the run applied the rotation to this file).
    """
    sw, sh = source_size
    fw, fh = file_size
    if mode is Mode.FILL_CROP:
        s = max(fw / sw, fh / sh)
        w, h = sw * s, sh * s
        return Geometry(turns, w, h, (w - fw) / 2, (h - fh) / 2, fw, fh)
    if mode is Mode.PAD:
        s = min(fw / sw, fh / sh, 1.0)
        w, h = max(1, round(sw * s)), max(1, round(sh * s))
        # libvips gravity "centre": the left/top margin is the floor of half the spare room
        return Geometry(turns, w, h, -((fw - w) // 2), -((fh - h) // 2), fw, fh)
    return Geometry(turns, fw, fh, 0.0, 0.0, fw, fh)  # shrink, fill-distort, original
