"""Decoded, resized images of a dataset version, cached once in S3 and reused by every run.

JPEG decoding is the expensive part of reading HAM10000, and it gives the same pixels every time, so
it is done once per (dataset version, size): every image is decoded with PIL, converted to RGB,
resized to size x size (bicubic, which PIL antialiases when shrinking; the whole image is squashed
to a square, as DermaMNIST does, so no lesion border is cropped away) and stored as one uint8 array:

    <dataset_uri>/cache/<size>/images.npy       (N, size, size, 3) uint8
    <dataset_uri>/cache/<size>/image_ids.json   row i of images.npy is image_ids[i]
    <dataset_uri>/cache/<size>/manifest.json    written last (stage contract): the cache is finished

A copy is kept in the scratch directory (verified by sha256 against the manifest), so repeated runs
with a persistent DERMAOPS_SCRATCH_DIR do not even download it. Two stages building the same cache
at once (train and train_baseline run in parallel) write byte-identical files, so the race is harmless.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermaops.dataset import Dataset, image_id_of
from dermaops.errors import StageError
from dermaops.stage import Context, fingerprint, read_verified
from dermaops.store import S3Uri, sha256_file

# Bump when the decoding/resizing recipe changes: it is part of the cache fingerprint.
CACHE_FORMAT = "pil-rgb-bicubic-squash-v1"
MIN_SIZE, MAX_SIZE = 8, 1024
DECODE_BATCH = 256

log = logging.getLogger(__name__)


@dataclass
class CachedImages:
    ids: list[str]
    images: np.ndarray
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self._index = {image_id: i for i, image_id in enumerate(self.ids)}

    def rows(self, image_ids) -> np.ndarray:
        """The images of `image_ids`, in that order."""
        missing = [i for i in image_ids if i not in self._index]
        if missing:
            raise StageError(
                f"{len(missing)} image_ids are not in the image cache (first: {', '.join(map(str, missing[:5]))}); "
                f"does the split belong to this dataset version?"
            )
        return self.images[[self._index[i] for i in image_ids]]


def decode_image(data: bytes, size: int) -> np.ndarray:
    """JPEG/PNG bytes -> (size, size, 3) uint8 RGB, the cache's exact recipe."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        # draft() lets the JPEG decoder skip detail we are about to throw away (big speed-up at 600x450).
        img.draft("RGB", (size * 2, size * 2))
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)


def _count_images(dataset: Dataset) -> int:
    total = 0
    for archive in dataset.archives:
        with zipfile.ZipFile(dataset.local(archive)) as zf:
            total += sum(1 for info in zf.infolist() if not info.is_dir() and image_id_of(info.filename))
    return total


def build_images(dataset: Dataset, size: int) -> CachedImages:
    """Decode and resize every image of the dataset (threads: PIL releases the GIL while decoding)."""
    started = time.monotonic()
    n = _count_images(dataset)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    ids: list[str] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    last_log = started
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[str, bytes]] = []

        def flush():
            try:
                decoded = list(pool.map(lambda item: decode_image(item[1], size), pending))
            except OSError as exc:
                raise StageError(f"cannot decode an image of {dataset.uri} near {pending[0][0]}: {exc}") from exc
            for (image_id, _), array in zip(pending, decoded, strict=True):
                images[len(ids)] = array
                ids.append(image_id)
            pending.clear()

        for image_id, _archive, data in dataset.iter_images():
            pending.append((image_id, data))
            if len(pending) >= DECODE_BATCH:
                flush()
                if time.monotonic() - last_log > 30:
                    last_log = time.monotonic()
                    log.info("image cache %d px: decoded %d/%d images", size, len(ids), n)
        flush()
    if len(set(ids)) != len(ids):
        raise StageError(f"dataset {dataset.uri} has duplicate image_ids across its archives")
    log.info("image cache %d px: decoded %d images in %.1f s", size, len(ids), time.monotonic() - started)
    return CachedImages(ids, images)


def _cache_fingerprint(dataset: Dataset, size: int) -> str:
    return fingerprint(dataset_version=dataset.version, size=size, format=CACHE_FORMAT)


def cache_uri(dataset: Dataset, size: int) -> S3Uri:
    return dataset.uri.join("cache", str(size))


def load_images(ctx: Context, dataset: Dataset, size: int) -> CachedImages:
    """The dataset's images at size x size: from scratch, else from S3, else built once and published."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise StageError(f"image size {size} is out of range ({MIN_SIZE}..{MAX_SIZE} px)")
    out = ctx.output(cache_uri(dataset, size), "imagecache", _cache_fingerprint(dataset, size))
    local = ctx.scratch / "imagecache" / dataset.version / str(size)
    manifest = out.finished()
    if manifest is not None:
        images = _fetch(ctx, out, manifest, local / "images.npy")
        ids = json.loads(read_verified(ctx.store, out.prefix, "image_ids.json", manifest))
        log.info("image cache %d px: reusing %s (%d images)", size, out.prefix, len(ids))
        return CachedImages(ids, images)

    log.info("image cache %d px: building %s (decoding every image once)", size, out.prefix)
    cached = build_images(dataset, size)
    local.mkdir(parents=True, exist_ok=True)
    np.save(local / "images.npy", cached.images)
    out.unpublish()
    out.put_file("images.npy", local / "images.npy", content_type="application/octet-stream")
    out.put_json("image_ids.json", cached.ids)
    out.publish({"dataset_version": dataset.version, "size": size, "n_images": len(cached.ids), "format": CACHE_FORMAT})
    return cached


def _fetch(ctx: Context, out, manifest: dict, path: Path) -> np.ndarray:
    entry = manifest["files"]["images.npy"]
    if not (path.exists() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]):
        ctx.store.download(out.uri("images.npy"), path)
        if sha256_file(path) != entry["sha256"]:
            path.unlink()
            raise StageError(f"checksum mismatch for {out.uri('images.npy')}: the image cache is corrupt")
    return np.load(path)
