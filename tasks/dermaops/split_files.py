"""Reading a published split (the split stage's output): its CSVs, checked, for every stage that trains
or scores on it."""

from __future__ import annotations

import io

from dermaops.dataset import CLASSES
from dermaops.errors import StageError
from dermaops.stage import read_verified
from dermaops.store import S3Uri


def read_split_csv(store, split_uri: S3Uri, name: str, manifest: dict | None = None):
    """One of the split's CSVs (name: train, val or test) as a DataFrame, verified against the sha256 in the
    split's manifest (given, or read now), with its image_id and label columns checked, and, where it has dx,
    every label matching its dx."""
    import pandas as pd

    uri = split_uri.join(f"{name}.csv")
    frame = pd.read_csv(io.BytesIO(read_verified(store, split_uri, f"{name}.csv", manifest)))
    missing = [c for c in ("image_id", "label") if c not in frame.columns]
    if missing:
        raise StageError(f"{uri} lacks columns {missing}")
    if frame.empty:
        raise StageError(f"{uri} has no rows")
    if "dx" in frame.columns:
        expected = frame["dx"].map({c: i for i, c in enumerate(CLASSES)})
        bad = frame[expected != frame["label"]]
        if len(bad):
            raise StageError(
                f"{uri}: label does not match dx for {len(bad)} rows "
                f"(first: {bad['image_id'].iloc[0]} dx={bad['dx'].iloc[0]} label={bad['label'].iloc[0]})"
            )
    return frame
