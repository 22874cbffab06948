"""The per-mask facts table the masks expectation suite runs on: one row per lesion mask in the
dataset's masks zip, plus one row per image that has no mask (`has_mask` False), so that "every image
has exactly one well-formed mask" is a set of column expectations that name the image_id.

Every mask is fully decoded through `dataset.mask_grey_levels` (grey levels as the mask shows them,
a palette applied); the grey levels present and the lesion share come from its pixels. PIL's draft
mode does not apply to PNG, so a 600x450 mask costs about 1.5 ms of CPU (10,015 masks: 15 s on one
core), and the masks are decoded in a process pool.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

from dermaops.dataset import LESION, ORIGINAL_SIZE, mask_grey_levels
from dermaops.imagefile import open_image

log = logging.getLogger(__name__)

COLUMNS = (
    "image_id",
    "has_mask",
    "has_image",
    "bytes",
    "decodes",
    "mode",
    "width",
    "height",
    "values",
    "lesion_share",
    "size_fit",
    "error",
)
CHUNK = 128  # masks per task sent to a decoding process (about 1 KB each): amortises the round trip
MAX_LISTED_LEVELS = 4  # more distinct grey levels than this are summarised as "<n> levels <lo>..<hi>"


def levels(values: list[int]) -> str:
    """The grey levels present, short enough to read in a failure line: `0,255` or `256 levels 0..255`."""
    if len(values) <= MAX_LISTED_LEVELS:
        return ",".join(str(v) for v in values)
    return f"{len(values)} levels {values[0]}..{values[-1]}"


def describe_mask(data: bytes) -> dict:
    """Decode one mask; never raises, a failure is a fact like any other."""
    import numpy as np

    facts = dict.fromkeys(("mode", "width", "height", "values", "lesion_share", "error")) | {"decodes": False}
    try:
        image = open_image(data, "the mask")  # the pixel limit of every decode: a bomb becomes a failed fact
        mode = image.mode  # the file's own mode: L or P in HAM10000
        pixels = np.asarray(mask_grey_levels(image))
        lesion = np.count_nonzero(pixels == LESION)
        skin = np.count_nonzero(pixels == 0)
        if lesion + skin == pixels.size:  # binary: two comparisons cost a quarter of a full histogram
            values = [v for v, n in ((0, skin), (LESION, lesion)) if n]
        else:
            values = np.flatnonzero(np.bincount(pixels.ravel(), minlength=256)).tolist()
        height, width = pixels.shape
        facts.update(
            decodes=True,
            mode=mode,
            width=width,
            height=height,
            values=levels(values),
            lesion_share=round(lesion / pixels.size, 6),
        )
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        facts["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return facts


def _describe_chunk(chunk: list[tuple[str, bytes]]) -> list[dict]:
    return [{"image_id": image_id, "bytes": len(data), **describe_mask(data)} for image_id, data in chunk]


def _chunks(items: Iterable[tuple[str, bytes]], n: int) -> Iterator[list[tuple[str, bytes]]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, n)):
        yield chunk


def describe_masks(masks: Iterable[tuple[str, bytes]], workers: int | None = None) -> Iterator[dict]:
    """Facts of each (image_id, PNG bytes) in input order, decoded by a process pool.

    Processes, not threads: the PNG decoder holds the GIL for much of a small image. At most
    2 x workers chunks are in flight, so memory stays bounded whatever the number of masks.
    """
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    chunks = _chunks(masks, CHUNK)
    head = list(itertools.islice(chunks, 2))
    if workers == 1 or len(head) < 2:  # one chunk: starting a pool would cost more than it saves
        for chunk in itertools.chain(head, chunks):
            yield from _describe_chunk(chunk)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for chunk in itertools.chain(head, chunks):
            pending.append(pool.submit(_describe_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def image_sizes(image_facts) -> dict[str, tuple[int, int] | None]:
    """image_id -> (width, height) from the per-image facts (`image_facts.build_image_facts`), None where
    the image does not decode; the first file of an image_id that has two (the images suite fails that)."""
    sizes: dict[str, tuple[int, int] | None] = {}
    for row in image_facts.itertuples():
        sizes.setdefault(row.image_id, (int(row.width), int(row.height)) if row.decodes else None)
    return sizes


def size_fit(mask_size: tuple[int, int], image_size: tuple[int, int] | None) -> str | None:
    """`image` (the size of its image), `original` (600x450, the release's masks of a downsized image),
    else what does not fit, e.g. `300x225 (image 200x150)`. None when the image's size is unknown (no
    image, or it does not decode): the expectations on those facts report it."""
    if image_size is None:
        return None
    if mask_size == image_size:
        return "image"
    if mask_size == ORIGINAL_SIZE:
        return "original"
    return f"{mask_size[0]}x{mask_size[1]} (image {image_size[0]}x{image_size[1]})"


def build_mask_facts(
    masks: Iterable[tuple[str, bytes]],
    image_sizes: Mapping[str, tuple[int, int] | None],
    workers: int | None = None,
):
    """The facts DataFrame for (image_id, PNG bytes) pairs, as `Dataset.iter_masks()` yields them.

    `image_sizes` maps the image_id of every image in the archives to its (width, height), None
    where the image does not decode. A mask whose image_id is not there has no image (`has_image`
    False); an image with no mask gets a row of its own (`has_mask` False, no other facts); two
    masks of one image_id are two rows with that image_id.
    """
    import pandas as pd

    started = time.monotonic()
    rows = []
    for row in describe_masks(masks, workers):
        image_size = image_sizes.get(row["image_id"])
        mask_size = (row["width"], row["height"])
        fit = size_fit(mask_size, image_size) if row["decodes"] else None
        rows.append({**row, "has_mask": True, "has_image": row["image_id"] in image_sizes, "size_fit": fit})
    with_mask = {row["image_id"] for row in rows}
    rows += [
        {"image_id": image_id, "has_mask": False, "has_image": True, "decodes": None}
        for image_id in sorted(set(image_sizes) - with_mask)
    ]
    facts = pd.DataFrame(rows, columns=list(COLUMNS))
    # Integer columns stay integers in the CSV even where a row has no mask or a mask does not decode.
    facts = facts.astype(
        {"bytes": "Int64", "width": "Int64", "height": "Int64", "has_mask": "bool", "has_image": "bool"}
    )
    log.info("mask facts: %d masks in %.1f s", int(facts["has_mask"].sum()), time.monotonic() - started)
    return facts
