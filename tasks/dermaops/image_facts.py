"""The per-image facts table the images expectation suite runs on: one row per image file.

Every image is fully decoded (not just its header read): a truncated JPEG or a non-image file named
`ISIC_xxx.jpg` only shows up when the pixel data is read, and training decodes every pixel later.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping

from dermaops.imagefile import open_image

log = logging.getLogger(__name__)

COLUMNS = ("image_id", "archive", "bytes", "sha256", "decodes", "mode", "width", "height", "format", "error")
PROGRESS_EVERY_S = 30.0


def describe_image(data: bytes, name: str = "the image") -> dict:
    """Decode one image file; never raises, a failure is a fact like any other (an image over the pixel
    limit of dermaops.imagefile is one, found before anything is decoded)."""
    facts = {"decodes": False, "mode": None, "width": None, "height": None, "format": None, "error": None}
    try:
        with open_image(data, name) as image:
            image.load()
            facts.update(decodes=True, mode=image.mode, width=image.width, height=image.height, format=image.format)
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        facts["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return facts


def build_image_facts(images: Iterable[tuple[str, str, bytes]], lesion_of: Mapping[str, str]):
    """The facts DataFrame for (image_id, archive, bytes) triples, as `Dataset.iter_images()` yields them.

    `lesion_of` maps the metadata's image_ids to their lesion_id. From it come `in_metadata` (an image
    without a metadata row is unlabelled), `lesion_id`, and `lesions_with_same_bytes`: how many
    distinct lesions have a file byte-identical to this one. HAM10000 itself holds a few identical
    files of the SAME lesion, which a lesion-grouped split keeps together; identical files of two
    different lesions would land in different splits and leak test images into training.
    """
    import pandas as pd

    rows = []
    started = last_log = time.monotonic()
    for image_id, archive, data in images:
        rows.append(
            {
                "image_id": image_id,
                "archive": archive,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                **describe_image(data, f"image {image_id}"),
            }
        )
        if time.monotonic() - last_log > PROGRESS_EVERY_S:
            last_log = time.monotonic()
            log.info("image facts: %d images decoded (%.0f s)", len(rows), last_log - started)
    facts = pd.DataFrame(rows, columns=list(COLUMNS))
    # Integer columns stay integers in the CSV even when a failed decode leaves a gap.
    facts = facts.astype({"bytes": "int64", "width": "Int64", "height": "Int64", "decodes": "bool"})
    facts["in_metadata"] = facts["image_id"].isin(lesion_of.keys())
    facts["lesion_id"] = facts["image_id"].map(lesion_of)
    facts["lesions_with_same_bytes"] = facts.groupby("sha256")["lesion_id"].transform("nunique").astype("int64")
    log.info("image facts: %d images in %.1f s", len(facts), time.monotonic() - started)
    return facts
