"""Small real packs for whole-pipeline runs: lesion-complete subsets of the 28 px and 200 px packs, written
in the official layout (metadata CSV + the two image zips, and the lesion masks zip where the source pack
has one; members copied byte for byte).

Big enough for every stage to do real work (all 7 classes in train, val and test after a lesion-grouped
split), small enough that a whole DAG run takes a minute or two on CPU.
"""

from __future__ import annotations

import csv
import random
import zipfile
from pathlib import Path

import pytest
from dermaops.dataset import ARCHIVES, MASKS_ARCHIVE

IMAGES_PER_CLASS = 90


def write_subset_pack(source: Path, dest: Path, per_class: int, seed: int = 7, corrupt_dx: str | None = None) -> Path:
    """Copy whole lesions of each class until it has `per_class` images; optionally set one row's dx
    to `corrupt_dx` (a value validation must reject)."""
    with open(source / "HAM10000_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    lesions: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lesions.setdefault((row["dx"], row["lesion_id"]), []).append(row)
    keys = sorted(lesions)
    random.Random(seed).shuffle(keys)
    taken: dict[str, int] = {}
    chosen: list[dict] = []
    for dx, lesion in keys:
        if taken.get(dx, 0) < per_class:
            chosen += lesions[(dx, lesion)]
            taken[dx] = taken.get(dx, 0) + len(lesions[(dx, lesion)])
    if corrupt_dx is not None:
        chosen[0] = {**chosen[0], "dx": corrupt_dx}

    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(chosen)
    wanted = {f"{row['image_id']}.jpg" for row in chosen}
    if (source / MASKS_ARCHIVE).exists():
        wanted |= {f"{row['image_id']}_segmentation.png" for row in chosen}
    for archive in (*ARCHIVES, *([MASKS_ARCHIVE] if (source / MASKS_ARCHIVE).exists() else [])):
        with zipfile.ZipFile(source / archive) as src, zipfile.ZipFile(dest / archive, "w") as out:
            for member in src.infolist():
                if member.filename in wanted:
                    out.writestr(member, src.read(member))
    return dest


@pytest.fixture(scope="session")
def small_pack(pack_28px, tmp_path_factory) -> Path:
    """About 90 images per class (whole lesions) from the real 28 px pack."""
    return write_subset_pack(pack_28px, tmp_path_factory.mktemp("small-pack"), IMAGES_PER_CLASS)


@pytest.fixture(scope="session")
def small_pack_200px(pack_200px, tmp_path_factory) -> Path:
    """About 90 images per class (whole lesions) from the real 200 px pack, with their lesion masks."""
    return write_subset_pack(pack_200px, tmp_path_factory.mktemp("small-pack-200px"), IMAGES_PER_CLASS)


@pytest.fixture(scope="session")
def invalid_pack(pack_28px, tmp_path_factory) -> Path:
    """The same subset with one metadata row whose dx is not one of the 7 classes."""
    return write_subset_pack(pack_28px, tmp_path_factory.mktemp("invalid-pack"), IMAGES_PER_CLASS, corrupt_dx="xyz")
