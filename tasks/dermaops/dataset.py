"""Reading a published dataset version (written by `ingest`).

Layout under `s3://<bucket>/datasets/ham10000/<dataset_version>/`:

    HAM10000_metadata.csv          canonical metadata (CSV, even when the source served Dataverse's .tab)
    HAM10000_images_part_1.zip     the source archives, byte for byte
    HAM10000_images_part_2.zip
    HAM10000_segmentations_lesion.zip   optional: one binary lesion mask per image (Tschandl et al. 2020),
                                        under this name whatever the source called it; manifest key "masks"
    manifest.json                  written last: sha256 + size per file, dataset_version, counts
    cache/<size>/...               decoded uint8 arrays, written by the training stages

Stages download the files they need into their scratch directory once; a file already there with
the right sha256 is reused (a persistent DERMAOPS_SCRATCH_DIR makes repeated runs local).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dermaops.archives import read_member
from dermaops.errors import StageError
from dermaops.safepath import local_path
from dermaops.stage import read_manifest
from dermaops.store import ArtifactStore, S3Uri, sha256_file

METADATA = "HAM10000_metadata.csv"
ARCHIVES = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
# The lesion segmentations of the release: `ISIC_0024306_segmentation.png`, 600x450, 0 = skin, 255 = lesion.
MASKS_ARCHIVE = "HAM10000_segmentations_lesion.zip"
MASK_SUFFIX = "_segmentation"
ORIGINAL_SIZE = (600, 450)  # (width, height) of every HAM10000 original, and of the release's masks
LESION = 255  # the grey level of lesion pixels in a mask; skin is 0
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)


def image_id_of(member: str) -> str | None:
    """`ISIC_0024306.jpg` (possibly inside a folder) -> `ISIC_0024306`; None for non-images."""
    name = member.rsplit("/", 1)[-1]
    if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    return name.rsplit(".", 1)[0]


def mask_image_id_of(member: str) -> str | None:
    """`ISIC_0024306_segmentation.png` (possibly inside a folder) -> `ISIC_0024306`; None for other files."""
    stem = image_id_of(member)
    if stem is None or not stem.endswith(MASK_SUFFIX):
        return None
    return stem[: -len(MASK_SUFFIX)]


def mask_grey_levels(image):
    """An opened mask (PIL image) -> its grey levels as a mode-L image: 0 = skin, 255 = lesion.

    Always read a mask through this (or `open_mask`; `imagecache.decode_mask` brings it to a frame), never
    as raw pixel values: 402 of the 10,015 masks in the 200 px pack are palette (P) images whose palette
    runs from white at index 0 to black at index 255, so their raw indices are the inverse of the mask.
    convert("L") applies the palette and gives what the mask shows.
    """
    return image if image.mode == "L" else image.convert("L")


def open_mask(data: bytes, name: str = "a lesion mask"):
    """A mask's PNG bytes -> its grey levels as a mode-L PIL image (see `mask_grey_levels`), under the pixel
    limit every decode keeps (dermaops.imagefile)."""
    from dermaops.imagefile import open_image

    with open_image(data, name) as image:
        return mask_grey_levels(image.copy() if image.mode == "L" else image)


@dataclass
class Dataset:
    store: ArtifactStore
    uri: S3Uri
    manifest: dict
    scratch: Path

    @classmethod
    def open(cls, store: ArtifactStore, uri: str | S3Uri, scratch: Path) -> Dataset:
        uri = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        manifest = read_manifest(store, uri, what="dataset version")
        return cls(store, uri, manifest, scratch)

    @property
    def version(self) -> str:
        return self.manifest["dataset_version"]

    @property
    def identity(self) -> dict:
        """What a stage's input fingerprint needs to know about this dataset version."""
        return {
            "dataset": str(self.uri),
            "dataset_fingerprint": self.manifest.get("fingerprint"),
            "dataset_version": self.version,
        }

    @property
    def archives(self) -> list[str]:
        return list(self.manifest.get("archives", ARCHIVES))

    def local(self, name: str) -> Path:
        """Download one dataset file into scratch (verified by sha256) and return its path."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise StageError(f"dataset {self.uri} has no file {name!r} (files: {sorted(self.manifest['files'])})")
        # The version and the file names come from manifest.json: data, checked before they become a path.
        path = local_path(self.scratch / "datasets", f"{self.version}/{name}", f"dataset {self.uri}: file")
        if path.exists() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]:
            return path
        self.store.download(self.uri.join(name), path)
        if sha256_file(path) != entry["sha256"]:
            path.unlink()
            raise StageError(f"checksum mismatch for {self.uri.join(name)}: the stored file differs from manifest.json")
        return path

    @property
    def masks_archive(self) -> str | None:
        """The stored lesion-mask zip of this version, or None when its source had none."""
        return self.manifest.get("masks")

    @cached_property
    def metadata(self):
        import pandas as pd

        df = pd.read_csv(self.local(self.manifest.get("metadata", METADATA)))
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise StageError(f"metadata of {self.uri} lacks columns {missing}")
        return df

    def iter_images(self) -> Iterator[tuple[str, str, bytes]]:
        """Yield (image_id, archive name, file bytes) for every image in every archive."""
        for archive in self.archives:
            with zipfile.ZipFile(self.local(archive)) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    image_id = image_id_of(info.filename)
                    if image_id is not None:
                        yield image_id, archive, read_member(zf, info, f"{self.uri.join(archive)}")

    def iter_masks(self) -> Iterator[tuple[str, bytes]]:
        """Yield (image_id, PNG bytes) for every lesion mask; nothing when the version has no masks."""
        if self.masks_archive is None:
            return
        with zipfile.ZipFile(self.local(self.masks_archive)) as zf:
            for info in zf.infolist():
                image_id = None if info.is_dir() else mask_image_id_of(info.filename)
                if image_id is not None:
                    yield image_id, read_member(zf, info, f"{self.uri.join(self.masks_archive)}")
