"""Decoded, resized images of a dataset version, cached once in S3 as fixed-size shards and reused by every run.

JPEG decoding is the expensive part of reading HAM10000, and it gives the same pixels every time, so
it is done once per (dataset version, frame): every image is decoded with PIL in JPEG draft mode (the
decoder's DCT scaling to the smallest size that still covers the target, see `decode_image`), converted
to RGB, the frame's part of the picture (`dermaops.frame`: the whole of it squashed or at its 4:3
shape, or the centre square) resized to the frame's height x width (bicubic, which PIL antialiases when
shrinking) in a process pool, and stored as uint8 `.npy` shards of a fixed byte budget:

    <dataset_uri>/cache/<frame>/shards/00000.npy  (rows_per_shard, height, width, 3) uint8; the last may be shorter
    <dataset_uri>/cache/<frame>/image_ids.json    global row i (shard i // rows_per_shard) is image_ids[i]
    <dataset_uri>/cache/<frame>/manifest.json     written last (stage contract); sha256 + size of every shard

`<frame>` is the bare size for squash (the layout caches had before geometries), else `aspect-128`,
`crop-96`, ...

Why shards of SHARD_BYTES (64 MiB): memory. A reader memory-maps the shards and copies out only the
rows it asks for, so neither building nor reading ever holds the whole cache: the builder holds one
shard, a reader's resident pages are dropped after each read (`_drop_pages`). 64 MiB is large enough
that one S3 request per shard costs a few percent of its transfer (200k images at 64 px: 38 shards,
not 200k objects), it is eight of boto3's 8 MiB multipart chunks, it hashes in ~0.1 s when a process
verifies it on first open, and a failed download or rebuild loses at most one shard. A reader
fetches from S3 only the shards that hold rows it asks for.

A copy of the shards is kept in the scratch directory (verified by sha256 against the manifest once
per shard and process), so repeated runs with a persistent DERMAOPS_SCRATCH_DIR do not even download
them. Two stages building the same cache at once (train and train_baseline run in parallel) write
byte-identical files, so the race is harmless. A cache in the old single-file format (images.npy) is
rebuilt as shards, with a log line saying so.

`CachedImages.rows(ids)` gathers rows into an array (the stages' API); `CachedImages.dataset(ids, labels)`
is a map-style torch Dataset for a DataLoader with worker processes: it pickles as shard paths only
and each worker opens the memory maps it touches lazily. Its `__getitems__` returns whole batches
(use `collate_fn=collate_batch`), and because it is an ordinary map-style Dataset with `__len__`,
a DistributedSampler shards it across ranks with no change.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermaops.archives import read_member
from dermaops.dataset import Dataset, image_id_of
from dermaops.errors import StageError
from dermaops.frame import Frame
from dermaops.imagefile import open_image
from dermaops.safepath import local_path
from dermaops.stage import Context, fingerprint, read_verified
from dermaops.store import S3Uri, sha256_file

# Bump when the decoding/resizing recipe or the layout changes: it is part of the cache fingerprint.
# The squash geometry keeps the format string it had before geometries, so its caches stay valid; the other
# geometries add theirs to the fingerprint (`_cache_fingerprint`).
CACHE_FORMAT = "u8-npy-shards-64mib:pil-rgb-draft-bicubic-squash-v2"
LEGACY_FILE = "images.npy"  # the old single-array format (CACHE_FORMAT "pil-rgb-bicubic-squash-v1")
SHARD_BYTES = 64 * 2**20
SHARD_DIR = "shards"
DECODE_CHUNK = 64  # images per task sent to a decoding process: amortises the pickling round trip

log = logging.getLogger(__name__)


def rows_per_shard(frame: Frame | int) -> int:
    height, width = Frame.of(frame).shape
    return max(1, SHARD_BYTES // (height * width * 3))


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.npy"


# -- decoding ---------------------------------------------------------------------------------


def _resize(img, frame: Frame, full_size: tuple[int, int], resample) -> np.ndarray:
    """The frame's box of a picture whose original size is `full_size` (draft mode may have shrunk `img`),
    resized to the frame's shape."""
    height, width = frame.shape
    sx, sy = img.size[0] / full_size[0], img.size[1] / full_size[1]
    left, top, right, bottom = frame.box(*full_size)
    box = (left * sx, top * sy, right * sx, bottom * sy)
    if img.size == (width, height) and box == (0, 0, width, height):
        return np.asarray(img, dtype=np.uint8)
    return np.asarray(img.resize((width, height), resample, box=box), dtype=np.uint8)


def decode_image(data: bytes, frame: Frame | int, name: str = "an image") -> np.ndarray:
    """JPEG/PNG bytes -> (height, width, 3) uint8 RGB of the frame (a bare size: squashed square), the
    cache's exact recipe.

    draft() makes the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT domain, to the smallest size at which
    the frame's box still covers the target (600x450 at 224 px squashed: 300x225), so the resize that follows
    starts from far fewer pixels. Within PSNR 35 dB of a full decode + resize (tests/test_imagecache.py);
    a no-op for PNG. An image over the pixel limit is refused before decoding, naming `name`
    (dermaops.imagefile).
    """
    from PIL import Image

    frame = Frame.of(frame)
    height, width = frame.shape
    with open_image(data, name) as img:
        full_w, full_h = img.size
        left, top, right, bottom = frame.box(full_w, full_h)
        # The whole picture at the size where the box is still >= the target (draft only ever shrinks by 2^k).
        img.draft("RGB", (math.ceil(full_w * width / (right - left)), math.ceil(full_h * height / (bottom - top))))
        return _resize(img.convert("RGB"), frame, (full_w, full_h), Image.Resampling.BICUBIC)


def decode_full(data: bytes, frame: Frame | int, name: str = "an image") -> np.ndarray:
    """The reference path draft mode is checked against: decode every pixel, then resize."""
    from PIL import Image

    with open_image(data, name) as img:
        return _resize(img.convert("RGB"), Frame.of(frame), img.size, Image.Resampling.BICUBIC)


def decode_mask(data: bytes, frame: Frame | int, name: str = "a lesion mask") -> np.ndarray:
    """A lesion mask (PNG, 0 = skin, 255 = lesion, at its image's size or the original's) -> (height, width)
    bool of the frame, through the same box as its image: each output pixel is lesion when at least half
    of the mask pixels it covers are (box filter, so a thin border neither vanishes nor grows)."""
    from PIL import Image

    from dermaops.dataset import LESION, open_mask

    grey = open_mask(data, name)  # palette masks read through their palette (dermaops.dataset.mask_grey_levels)
    binary = grey.point(lambda v: 255 if v == LESION else 0)
    return _resize(binary, Frame.of(frame), grey.size, Image.Resampling.BOX) >= 128


def _decode_chunk(chunk: list[tuple[str, bytes]], frame: Frame) -> np.ndarray:
    out = np.empty((len(chunk), *frame.shape, 3), dtype=np.uint8)
    for i, (image_id, data) in enumerate(chunk):
        try:
            out[i] = decode_image(data, frame, f"image {image_id}")
        except OSError as exc:
            raise StageError(f"cannot decode image {image_id}: {exc}") from None
    return out


def _chunks(items: Iterable[tuple[str, bytes]], n: int) -> Iterator[list[tuple[str, bytes]]]:
    chunk: list[tuple[str, bytes]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decode_all(
    items: Iterable[tuple[str, bytes]], frame: Frame | int, workers: int | None = None
) -> Iterator[tuple[list, np.ndarray]]:
    """(image_ids, decoded uint8 batch) in input order, decoded by a process pool.

    Processes, not threads: PIL releases the GIL only inside the codec, and the Python around each
    image (open, convert, resize calls, array copies) would serialise threads on small images.
    At most 2 x workers chunks are in flight, so memory stays bounded whatever the dataset size.
    """
    frame = Frame.of(frame)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if workers == 1:
        for chunk in _chunks(items, DECODE_CHUNK):
            yield [i for i, _ in chunk], _decode_chunk(chunk, frame)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = []
        for chunk in _chunks(items, DECODE_CHUNK):
            pending.append(([i for i, _ in chunk], pool.submit(_decode_chunk, chunk, frame)))
            if len(pending) >= 2 * workers:
                ids, future = pending.pop(0)
                yield ids, future.result()
        for ids, future in pending:
            yield ids, future.result()


# -- shards -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFile:
    path: Path
    rows: int
    sha256: str
    nbytes: int


def build_shards(
    items: Iterable[tuple[str, bytes]],
    frame: Frame | int,
    directory: Path,
    on_shard: Callable[[int, ShardFile], None] | None = None,
    workers: int | None = None,
) -> tuple[list[str], list[ShardFile]]:
    """Decode (image_id, bytes) items into fixed-size shards under `directory`; memory holds one shard.

    `on_shard(index, shard)` runs as each shard is finished (the stage uploads it there), so a large
    cache goes to S3 while the rest is still decoding."""
    frame = Frame.of(frame)
    per_shard = rows_per_shard(frame)
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    buffer = np.empty((per_shard, *frame.shape, 3), dtype=np.uint8)
    ids: list[str] = []
    shards: list[ShardFile] = []
    filled = 0
    started = last_log = time.monotonic()

    def flush() -> None:
        nonlocal filled
        path = directory / shard_name(len(shards))
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            np.save(f, buffer[:filled])
        tmp.replace(path)
        shard = ShardFile(path, filled, sha256_file(path), path.stat().st_size)
        _mark_verified(path, shard.sha256)  # just hashed: this process need not hash it again
        shards.append(shard)
        if on_shard:
            on_shard(len(shards) - 1, shard)
        filled = 0

    for batch_ids, batch in decode_all(items, frame, workers):
        start = 0
        while start < len(batch):
            take = min(per_shard - filled, len(batch) - start)
            buffer[filled : filled + take] = batch[start : start + take]
            filled += take
            start += take
            if filled == per_shard:
                flush()
        ids.extend(batch_ids)
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            log.info("image cache %s: decoded %d images, %d shards written", frame.name, len(ids), len(shards))
    if filled:
        flush()
    if len(set(ids)) != len(ids):
        raise StageError(f"duplicate image_ids in the images being cached (e.g. {_first_duplicate(ids)})")
    elapsed = time.monotonic() - started
    log.info(
        "image cache %s: decoded %d images into %d shards of <= %d in %.1f s (%.0f images/s)",
        frame.name, len(ids), len(shards), per_shard, elapsed, len(ids) / max(elapsed, 1e-9),
    )  # fmt: skip
    return ids, shards


def _first_duplicate(ids: list[str]) -> str:
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            return image_id
        seen.add(image_id)
    return ""


# Shards this process has hashed, keyed by path -> (inode, size, mtime, sha256): a replaced file is hashed again.
_VERIFIED: dict[str, tuple[int, int, int, str]] = {}


def _file_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _mark_verified(path: Path, sha256: str) -> None:
    _VERIFIED[str(path)] = (*_file_key(path), sha256)


def verify_shard(path: Path, sha256: str) -> None:
    """Check a shard against its manifest sha256, once per shard and process (a forked DataLoader
    worker inherits its parent's checks; a spawned one hashes each shard it opens once)."""
    try:
        key = _file_key(path)
    except FileNotFoundError:
        raise StageError(f"image cache shard {path} is missing") from None
    if _VERIFIED.get(str(path)) == (*key, sha256):
        return
    actual = sha256_file(path)
    if actual != sha256:
        raise StageError(f"image cache shard {path} is corrupt: sha256 {actual[:12]}... != manifest {sha256[:12]}...")
    _VERIFIED[str(path)] = (*key, sha256)


def _drop_pages(mm: mmap.mmap) -> None:
    # Pages of a memory map that were read stay resident (and count in RSS) until unmapped; dropping
    # them after each read keeps a reader's memory flat however much of the cache it walks through.
    # They stay in the page cache, so reading them again costs a minor fault, not disk I/O.
    if hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class _Shards:
    """Lazily opened read-only memory maps of a cache's shards, private to each process."""

    def __init__(self, files: list[ShardFile], shape: tuple[int, int]):
        self.files = files
        self.shape = shape  # (height, width) of every row
        self._open: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    def __getstate__(self):
        return {"files": self.files, "shape": self.shape}  # memory maps do not cross processes: reopen there

    def __setstate__(self, state):
        self.__dict__.update(state, _open={})

    def array(self, index: int) -> tuple[mmap.mmap, np.ndarray]:
        if index not in self._open:
            shard = self.files[index]
            verify_shard(shard.path, shard.sha256)
            with open(shard.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                fmt = np.lib.format
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
                expected = (shard.rows, *self.shape, 3)
                if shape != expected or dtype != np.uint8 or fortran:
                    raise StageError(f"image cache shard {shard.path} holds {dtype} {shape}, expected uint8 {expected}")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._open[index] = (mm, np.frombuffer(mm, np.uint8, int(np.prod(shape)), offset).reshape(shape))
        return self._open[index]

    def gather(self, positions: np.ndarray, per_shard: int) -> np.ndarray:
        """Copy the rows at global `positions` (any order, repeats allowed) into a fresh array."""
        out = np.empty((len(positions), *self.shape, 3), dtype=np.uint8)
        shard_of, row_of = np.divmod(positions, per_shard)
        for index in np.unique(shard_of):
            mm, arr = self.array(int(index))
            where = np.flatnonzero(shard_of == index)
            rows = row_of[where]
            order = np.argsort(rows, kind="stable")  # ascending offsets: sequential reads within the shard
            out[where[order]] = arr[rows[order]]
            _drop_pages(mm)
        return out


class CachedImages:
    """The cached images of one dataset version in one frame, read row by row from memory-mapped shards."""

    def __init__(
        self,
        ids: list[str],
        files: list[ShardFile],
        frame: Frame | int,
        fetch: Callable[[int], None] | None = None,
        per_shard: int | None = None,
    ):
        self.ids = ids
        self.frame = Frame.of(frame)
        self.per_shard = per_shard or rows_per_shard(self.frame)  # the writer's, from the manifest when reading
        self._index = {image_id: i for i, image_id in enumerate(ids)}
        self._shards = _Shards(files, self.frame.shape)
        self._fetch = fetch  # downloads a shard that is not in scratch yet (None: all are local)
        self._fetched: set[int] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, image_ids) -> np.ndarray:
        missing = [i for i in image_ids if i not in self._index]
        if missing:
            raise StageError(
                f"{len(missing)} image_ids are not in the image cache (first: {', '.join(map(str, missing[:5]))}); "
                f"does the split belong to this dataset version?"
            )
        positions = np.fromiter((self._index[i] for i in image_ids), dtype=np.int64, count=len(image_ids))
        self._ensure_local(positions)
        return positions

    def _ensure_local(self, positions: np.ndarray) -> None:
        # Fetched (and so verified) here, in the process that builds DataLoaders: forked workers inherit the
        # check instead of each hashing every shard again.
        for index in np.unique(positions // self.per_shard).tolist():
            if index not in self._fetched:
                if self._fetch is not None:
                    self._fetch(index)
                else:
                    shard = self._shards.files[index]
                    verify_shard(shard.path, shard.sha256)
                self._fetched.add(index)

    def rows(self, image_ids) -> np.ndarray:
        """The images of `image_ids`, in that order (only the shards holding them are fetched and read)."""
        return self._shards.gather(self.positions(list(image_ids)), self.per_shard)

    def dataset(self, image_ids, labels=None) -> ShardDataset:
        """A map-style torch Dataset over the rows of `image_ids` (with their int labels, if given)."""
        image_ids = list(image_ids)
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if labels is not None and len(labels) != len(image_ids):
            raise StageError(f"{len(labels)} labels for {len(image_ids)} image_ids")
        return ShardDataset(self._shards, self.positions(image_ids), self.per_shard, labels)


class ShardDataset:
    """A map-style Dataset as torch's DataLoader and DistributedSampler take it (`__len__`, `__getitem__`).

    No torch base class, so importing this module needs no torch (the data image has none). Item i is
    (uint8 tensor (height, width, 3), label) of the i-th requested image; `__getitems__`, which a DataLoader
    calls with a whole batch of indices, reads the batch in one pass and returns [images, labels] tensors
    (collate with `collate_batch`). Labels are -1 when none were given."""

    def __init__(self, shards: _Shards, positions: np.ndarray, per_shard: int, labels: np.ndarray | None):
        self.shards = shards
        self.positions = positions
        self.per_shard = per_shard
        self.labels = labels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        images, labels = self.__getitems__([i])
        return images[0], labels[0]

    def __getitems__(self, indices) -> list:
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.shards.gather(self.positions[idx], self.per_shard))
        labels = torch.from_numpy(self.labels[idx]) if self.labels is not None else torch.full((len(idx),), -1)
        return [images, labels]


def collate_batch(batch):
    """DataLoader collate_fn for ShardDataset: `__getitems__` already returns (images, labels) tensors."""
    return batch


# -- the published cache ----------------------------------------------------------------------


def _cache_fingerprint(dataset: Dataset, frame: Frame) -> str:
    geometry = {} if frame.geometry == "squash" else {"geometry": frame.geometry}
    return fingerprint(dataset_version=dataset.version, size=frame.size, format=CACHE_FORMAT, **geometry)


def cache_uri(dataset: Dataset, frame: Frame | int) -> S3Uri:
    return dataset.uri.join("cache", Frame.of(frame).name)


def count_images(dataset: Dataset) -> int:
    total = 0
    for archive in dataset.archives:
        with zipfile.ZipFile(dataset.local(archive)) as zf:
            total += sum(1 for info in zf.infolist() if not info.is_dir() and image_id_of(info.filename))
    return total


def load_images(ctx: Context, dataset: Dataset, frame: Frame | int) -> CachedImages:
    """The dataset's images in `frame` (a bare size: squashed to that square): from scratch, else from S3,
    else built once and published."""
    frame = Frame.of(frame)
    out = ctx.output(cache_uri(dataset, frame), "imagecache", _cache_fingerprint(dataset, frame))
    local = local_path(ctx.scratch / "imagecache", f"{dataset.version}/{frame.name}", f"dataset {dataset.uri}: version")
    manifest = out.finished()
    if manifest is not None:
        ids = json.loads(read_verified(ctx.store, out.prefix, "image_ids.json", manifest))
        files = [
            ShardFile(
                local_path(local, name, f"image cache {out.prefix}: shard"),
                rows,
                manifest["files"][name]["sha256"],
                manifest["files"][name]["size"],
            )
            for name, rows in manifest["summary"]["shards"]
        ]

        def fetch(index: int) -> None:
            shard, uri = files[index], out.uri(shard_name(index))
            if shard.path.exists() and shard.path.stat().st_size == shard.nbytes:
                try:
                    verify_shard(shard.path, shard.sha256)
                    return
                except StageError:
                    log.warning("image cache %s: scratch copy of %s is corrupt; downloading it again", frame.name, uri)
            ctx.store.download(uri, shard.path)
            try:
                verify_shard(shard.path, shard.sha256)
            except StageError:
                shard.path.unlink(missing_ok=True)
                raise StageError(f"checksum mismatch for {uri}: the image cache is corrupt") from None

        log.info("image cache %s: reusing %s (%d images in %d shards)", frame.name, out.prefix, len(ids), len(files))
        return CachedImages(ids, files, frame, fetch, manifest["summary"]["rows_per_shard"])

    legacy = ctx.store.exists(out.uri(LEGACY_FILE))
    if legacy:
        log.info(
            "image cache %s: %s holds the old single-file format (%s); rebuilding it as %d-image shards",
            frame.name, out.prefix, LEGACY_FILE, rows_per_shard(frame),
        )  # fmt: skip
    else:
        log.info("image cache %s: building %s (decoding every image once)", frame.name, out.prefix)
    out.unpublish()
    n = count_images(dataset)

    def upload(index: int, shard: ShardFile) -> None:
        out.put_file(shard_name(index), shard.path, sha256=shard.sha256, content_type="application/octet-stream")

    items = ((image_id, data) for image_id, _archive, data in dataset.iter_images())
    ids, files = build_shards(items, frame, local, on_shard=upload)
    if len(ids) != n:
        raise StageError(f"dataset {dataset.uri}: decoded {len(ids)} images but its archives list {n}")
    out.put_json("image_ids.json", ids)
    out.publish(
        {
            "dataset_version": dataset.version,
            "size": frame.size,
            "geometry": frame.geometry,
            "shape": list(frame.shape),
            "n_images": len(ids),
            "format": CACHE_FORMAT,
            "rows_per_shard": rows_per_shard(frame),
            "shards": [[shard_name(i), f.rows] for i, f in enumerate(files)],
        }
    )
    if legacy:  # the new manifest is out: the superseded array can go
        ctx.store.delete(out.uri(LEGACY_FILE))
    return CachedImages(ids, files, frame)


def load_masks(dataset: Dataset, image_ids, frame: Frame | int) -> np.ndarray | None:
    """The lesion masks of `image_ids` in `frame`, (N, height, width) bool, in that order; None when the
    dataset version has no masks. Read straight from the stored zip (a few hundred PNGs for an evaluation:
    no cache needed); an image without a mask gets an empty one and a warning (validate reports it)."""
    if dataset.masks_archive is None:
        return None
    from dermaops.dataset import mask_image_id_of

    frame = Frame.of(frame)
    image_ids = list(image_ids)
    out = np.zeros((len(image_ids), *frame.shape), dtype=bool)
    wanted = {image_id: i for i, image_id in enumerate(image_ids)}
    found = 0
    with zipfile.ZipFile(dataset.local(dataset.masks_archive)) as zf:
        for info in zf.infolist():
            image_id = None if info.is_dir() else mask_image_id_of(info.filename)
            if image_id in wanted:
                try:
                    data = read_member(zf, info, str(dataset.uri.join(dataset.masks_archive)))
                    out[wanted[image_id]] = decode_mask(data, frame, f"the lesion mask of {image_id}")
                except OSError as exc:
                    raise StageError(f"cannot decode the lesion mask of {image_id} ({info.filename}): {exc}") from None
                found += 1
    if found < len(image_ids):
        log.warning("%d of %d images have no lesion mask in %s", len(image_ids) - found, len(image_ids),
                    dataset.masks_archive)  # fmt: skip
    return out
