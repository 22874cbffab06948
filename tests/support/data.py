"""The real HAM10000 packs in ../shared/data (read-only: tests copy before changing anything)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
PACK_28PX = SHARED_DATA / "ham10000-28px"
PACK_200PX = SHARED_DATA / "ham10000-200px"  # all 10,015 images at 200x150, with the lesion masks
PACK_SAMPLE = SHARED_DATA / "ham10000-sample"


@pytest.fixture(scope="session")
def pack_28px() -> Path:
    if not (PACK_28PX / "HAM10000_metadata.csv").exists():
        pytest.skip(f"real data pack missing: {PACK_28PX}")
    return PACK_28PX


@pytest.fixture(scope="session")
def pack_200px() -> Path:
    if not (PACK_200PX / "HAM10000_metadata.csv").exists():
        pytest.skip(f"real data pack missing: {PACK_200PX}")
    return PACK_200PX


@pytest.fixture(scope="session")
def pack_sample() -> Path:
    if not (PACK_SAMPLE / "HAM10000_metadata.csv").exists():
        pytest.skip(f"real data pack missing: {PACK_SAMPLE}")
    return PACK_SAMPLE
