"""Small packs with lesion masks, built from the real files: the 70 full-resolution images of the
sample pack with the real 600x450 masks of those image_ids, taken from the 200 px pack.

    pack_sample_masks            the sample pack + HAM10000_segmentations_lesion.zip (flat), with SHA256SUMS
    pack_sample_dataverse_masks  the same masks as the Dataverse release ships them: the zip named
                                 HAM10000_segmentations_lesion_tschandl.zip, its members in a folder of that name

The image zips and the metadata are symlinks to the read-only originals; tests that change a pack
build their own with `write_masks_zip` and `link_pack`.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
from dermaops.dataset import ARCHIVES, MASKS_ARCHIVE, METADATA

DATAVERSE_MASKS = "HAM10000_segmentations_lesion_tschandl.zip"


def sample_ids(pack: Path) -> list[str]:
    with open(pack / METADATA, newline="") as f:
        return [row["image_id"] for row in csv.DictReader(f)]


def real_masks(pack_200px: Path, image_ids: list[str]) -> dict[str, bytes]:
    """image_id -> the real mask's PNG bytes, as the 200 px pack stores it."""
    with zipfile.ZipFile(pack_200px / MASKS_ARCHIVE) as zf:
        return {image_id: zf.read(f"{image_id}_segmentation.png") for image_id in image_ids}


def write_masks_zip(path: Path, masks: Mapping[str, bytes], folder: str = "") -> Path:
    """A masks zip as the release has it: `<folder>ISIC_xxx_segmentation.png`, stored uncompressed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for image_id, data in masks.items():
            zf.writestr(f"{folder}{image_id}_segmentation.png", data)
    return path


def link_pack(pack: Path, dest: Path) -> Path:
    """A new pack directory whose metadata and image zips are symlinks to `pack`'s."""
    dest.mkdir()
    for name in (METADATA, *ARCHIVES):
        (dest / name).symlink_to(pack / name)
    return dest


def write_sums(pack: Path) -> None:
    """SHA256SUMS over every file of the pack, as the real packs have it."""
    lines = []
    for path in sorted(p for p in pack.iterdir() if p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    (pack / "SHA256SUMS").write_text("".join(lines))


@pytest.fixture(scope="session")
def sample_masks(pack_sample, pack_200px) -> dict[str, bytes]:
    """The real masks of the sample pack's 70 image_ids (two of them palette images)."""
    return real_masks(pack_200px, sample_ids(pack_sample))


@pytest.fixture(scope="session")
def pack_sample_masks(pack_sample, sample_masks, tmp_path_factory) -> Path:
    pack = link_pack(pack_sample, tmp_path_factory.mktemp("masks") / "sample-masks")
    write_masks_zip(pack / MASKS_ARCHIVE, sample_masks)
    write_sums(pack)
    return pack


@pytest.fixture(scope="session")
def pack_sample_dataverse_masks(pack_sample, sample_masks, tmp_path_factory) -> Path:
    pack = link_pack(pack_sample, tmp_path_factory.mktemp("masks") / "sample-dataverse-masks")
    write_masks_zip(pack / DATAVERSE_MASKS, sample_masks, folder=f"{DATAVERSE_MASKS.removesuffix('.zip')}/")
    write_sums(pack)
    return pack
