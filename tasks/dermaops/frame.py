"""How a source image becomes the model's input: the part of the picture kept (geometry) and its size.

HAM10000's pictures are 600x450 (4:3), the lesion mostly near the centre, the dermatoscope's dark
vignette in the corners. Three ways to make a fixed-size input of them:

    squash   the whole picture resized to size x size: nothing cut, the lesion stretched 4:3 -> 1:1
    aspect   the whole picture at its own 4:3 shape, size wide: round(size * 3 / 4) x size (200 -> 150x200)
    crop     the centre square (450x450 of 600x450), resized to size x size, as DermaMNIST / MedMNIST+ do:
             the undistorted lesion, but a quarter of the picture (its left and right edges) is gone

A picture of another shape is first cut to the largest centred box of the geometry's shape (4:3 for
aspect, a square for crop), so every image of one frame has the same shape. `Frame.box` is that box;
`imagecache.decode_image` resizes it (bicubic) and masks go through the same box
(`imagecache.decode_mask`), so a mask stays aligned with its image in every geometry.

The geometry is a training setting chosen on validation (docs/measurements.md, "Recipes on the 200 px
pack"); the checkpoint's meta carries it, so evaluate and predict feed a model exactly the frame it was
trained on. Standard library
only: the DAG file, the data image and the torch image all import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dermaops.errors import StageError

GEOMETRIES = ("squash", "aspect", "crop")  # the choices of the geometry setting (dermaops.config)
ASPECT_W, ASPECT_H = 4, 3  # HAM10000's 600x450 frame
MIN_SIZE, MAX_SIZE = 8, 1024


@dataclass(frozen=True)
class Frame:
    geometry: str
    size: int  # the input's width (its long side for aspect; the side for squash and crop)

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise StageError(f"unknown image geometry {self.geometry!r} (allowed: {', '.join(GEOMETRIES)})")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise StageError(f"image size {self.size} is out of range ({MIN_SIZE}..{MAX_SIZE} px)")

    @classmethod
    def of(cls, value: Frame | int) -> Frame:
        """A frame, or a bare size: the squashed square of that size (the geometry every earlier cache and
        checkpoint used)."""
        return value if isinstance(value, Frame) else cls("squash", int(value))

    @classmethod
    def from_meta(cls, meta: Mapping) -> Frame:
        """The frame a checkpoint (or baseline bundle) was trained on; squash for those written before geometries."""
        return cls(meta.get("geometry") or "squash", int(meta["image_size"]))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the input in pixels."""
        if self.geometry == "aspect":
            return round(self.size * ASPECT_H / ASPECT_W), self.size
        return self.size, self.size

    @property
    def name(self) -> str:
        """The cache's folder name: a bare size for squash (the layout of existing caches), else geometry-size."""
        return str(self.size) if self.geometry == "squash" else f"{self.geometry}-{self.size}"

    @property
    def square(self) -> bool:
        height, width = self.shape
        return height == width

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the part of a width x height picture this frame keeps."""
        if self.geometry == "squash":
            return 0.0, 0.0, float(width), float(height)
        aw, ah = (ASPECT_W, ASPECT_H) if self.geometry == "aspect" else (1, 1)
        box_w, box_h = (width, width * ah / aw) if width * ah <= height * aw else (height * aw / ah, height)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return left, top, left + box_w, top + box_h

    def describe(self) -> str:
        height, width = self.shape
        kept = {"squash": "whole picture squashed", "aspect": "whole picture, 4:3 kept", "crop": "centre square"}
        return f"{width}x{height} px ({kept[self.geometry]})"
