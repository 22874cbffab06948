"""Images that are not dermatoscopy, for the out-of-distribution tests and benchmark: the photographs that
scikit-image ships in `skimage.data` (bundled with the package, nothing downloaded), and corrupted copies of
real dermatoscopy JPEGs (dermaops.ood.corrupt: blurred, overexposed, turned with a black border).
"""

from __future__ import annotations

import io
from pathlib import Path

# skimage.data's bundled photographs and scans: people, animals, objects, space, a retina and a stained tissue
# section (medical, not dermatoscopy), greyscale ones as RGB.
PHOTOGRAPHS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
    "moon", "coins",
)  # fmt: skip


def photograph_jpegs(dest: Path) -> list[Path]:
    """Each of PHOTOGRAPHS saved as an RGB JPEG in `dest`."""
    import numpy as np
    import skimage.data
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOGRAPHS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., :3].astype(np.uint8)).save(buffer, format="JPEG", quality=92)
        path = dest / f"photo_{name}.jpg"
        path.write_bytes(buffer.getvalue())
        written.append(path)
    return written


def corrupted_jpegs(sources: list[Path], dest: Path) -> dict[str, list[Path]]:
    """kind -> the corrupted copies of `sources` (real dermatoscopy JPEGs), written to `dest`."""
    from dermaops.ood import CORRUPTIONS, corrupt

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in CORRUPTIONS:
        out[kind] = []
        for source in sources:
            path = dest / f"{kind}_{source.name}"
            path.write_bytes(corrupt(source.read_bytes(), kind, source.name))
            out[kind].append(path)
    return out
