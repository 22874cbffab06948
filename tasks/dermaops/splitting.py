"""Train/val/test split algorithms and the checks on their result (pure: DataFrames in and out, no I/O).

Every strategy returns a Series of split names (`SPLITS`) aligned with the metadata's index, so the
`split` stage checks and writes all of them the same way.

- `lesion_split`: stratified by dx, grouped by lesion_id (no lesion in two splits), fractions by images.
- `image_split`: the seed report's image-level split (stratified by dx, ignores lesions) for comparison.
- `official_split`: a given image_id -> split table, e.g. the DermaMNIST (MedMNIST v2) split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dermaops.config import parse_fractions  # noqa: F401 (the split stage's setting; re-exported)
from dermaops.errors import StageError

SPLITS = ("train", "val", "test")
OFFICIAL_COLUMNS = ("image_id", "dermamnist_split")


# -- strategies ---------------------------------------------------------------------------------


def lesion_strata(meta: pd.DataFrame) -> pd.Series:
    """Each lesion's stratum: its dx, or its majority dx when its images disagree (ties: first in
    alphabetical order, so the choice is deterministic). Indexed by lesion_id, sorted."""
    counts = meta.groupby(["lesion_id", "dx"]).size().rename("n").reset_index()
    counts = counts.sort_values(["lesion_id", "n", "dx"], ascending=[True, False, True])
    return counts.drop_duplicates("lesion_id").set_index("lesion_id")["dx"]


def mixed_dx_lesions(meta: pd.DataFrame) -> list[str]:
    """lesion_ids whose images carry more than one dx (none in the real HAM10000 metadata)."""
    n_dx = meta.groupby("lesion_id")["dx"].nunique()
    return sorted(n_dx.index[n_dx > 1])


def lesion_split(meta: pd.DataFrame, fractions: Sequence[float], seed: int) -> pd.Series:
    """Stratified by dx, grouped by lesion_id, with each class split by IMAGE count.

    Per class, the lesions are shuffled (seeded) and then taken largest first (a stable sort keeps
    the shuffled order among lesions of one size); each goes to the split whose image quota for that
    class stays relatively least filled with half the lesion counted in. Largest-first makes the
    single-image lesions, which every class has plenty of, come last and fill each quota to within
    half an image; the relative rule interleaves the splits, so each gets its share of multi-image
    lesions too (the mean lesion size is the same in all three on HAM10000). Counting half the lesion
    settles the last image of a class on the split it brings closest to its quota. A split still empty
    for the class goes first, so any class with three lesions appears in every split: a class missing
    from val or test would leave its metrics undefined, which is worse than a tiny class off target.
    """
    rng = np.random.default_rng(seed)
    strata = lesion_strata(meta)
    sizes = meta.groupby("lesion_id").size()
    assignment: dict[str, str] = {}
    for dx in sorted(strata.unique()):
        lesions = strata.index[strata == dx].to_numpy()
        lesions = lesions[rng.permutation(len(lesions))]
        lesion_sizes = sizes.loc[lesions].to_numpy()
        order = np.argsort(-lesion_sizes, kind="stable")
        quotas = np.asarray(fractions, dtype=float) * lesion_sizes.sum()
        filled = np.zeros(len(SPLITS))
        for lesion, size in zip(lesions[order], lesion_sizes[order], strict=True):
            room = np.where(filled == 0, np.inf, (quotas - filled - size / 2) / quotas)
            k = int(np.argmax(room))
            filled[k] += size
            assignment[lesion] = SPLITS[k]
    return meta["lesion_id"].map(assignment).rename("split")


def image_split(meta: pd.DataFrame, fractions: Sequence[float], seed: int) -> pd.Series:
    """The seed report's split: sklearn train_test_split twice, stratified by dx, lesions ignored."""
    from sklearn.model_selection import train_test_split

    _, val_fraction, test_fraction = fractions
    held_out = val_fraction + test_fraction
    try:
        train_idx, rest_idx = train_test_split(
            meta.index.to_numpy(), test_size=held_out, stratify=meta["dx"], random_state=seed
        )
        val_idx, test_idx = train_test_split(
            rest_idx, test_size=test_fraction / held_out, stratify=meta.loc[rest_idx, "dx"], random_state=seed
        )
    except ValueError as exc:
        # sklearn refuses to stratify a class with too few images; name the class instead of its message.
        smallest = meta["dx"].value_counts()
        raise StageError(
            f"class {smallest.index[-1]!r} has only {smallest.iloc[-1]} images: too few for a stratified "
            f"image-level split with fractions {tuple(fractions)} ({exc})"
        ) from None
    split = pd.Series(index=meta.index, dtype=object, name="split")
    for name, idx in zip(SPLITS, (train_idx, val_idx, test_idx), strict=True):
        split.loc[idx] = name
    return split


def official_split(meta: pd.DataFrame, official: pd.DataFrame) -> pd.Series:
    """The split a table of (image_id, dermamnist_split) gives; it must cover exactly the metadata's ids."""
    check_official(meta, official)
    return meta["image_id"].map(official.set_index("image_id")["dermamnist_split"]).rename("split")


# -- checks -------------------------------------------------------------------------------------


def _first(ids, n: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def check_metadata(meta: pd.DataFrame, classes: Sequence[str]) -> None:
    """What every strategy relies on: unique image_ids, a lesion_id for every image, known dx."""
    duplicated = meta["image_id"][meta["image_id"].duplicated()]
    if len(duplicated):
        raise StageError(f"metadata has {len(duplicated)} duplicated image_ids: {_first(set(duplicated))}")
    no_lesion = meta["image_id"][meta["lesion_id"].isna()]
    if len(no_lesion):
        raise StageError(f"metadata has {len(no_lesion)} images without lesion_id: {_first(no_lesion)}")
    unknown = sorted(set(meta["dx"].dropna()) - set(classes)) + (["<missing>"] if meta["dx"].isna().any() else [])
    if unknown:
        raise StageError(f"metadata has dx values {unknown} outside the classes {list(classes)}")


def check_official(meta: pd.DataFrame, official: pd.DataFrame) -> None:
    missing = [c for c in OFFICIAL_COLUMNS if c not in official.columns]
    if missing:
        raise StageError(f"official split file lacks columns {missing} (has {list(official.columns)})")
    bad = sorted(set(official["dermamnist_split"].astype(str)) - set(SPLITS))
    if bad:
        raise StageError(f"official split file has dermamnist_split values {bad}; allowed: {list(SPLITS)}")
    duplicated = official["image_id"][official["image_id"].duplicated()]
    if len(duplicated):
        raise StageError(f"official split file lists {len(duplicated)} image_ids twice: {_first(set(duplicated))}")
    unknown = set(official["image_id"]) - set(meta["image_id"])
    if unknown:
        raise StageError(f"official split file has {len(unknown)} image_ids not in the metadata: {_first(unknown)}")
    unassigned = set(meta["image_id"]) - set(official["image_id"])
    if unassigned:
        raise StageError(f"official split file lacks {len(unassigned)} metadata image_ids: {_first(unassigned)}")


def check_enough_per_class(meta: pd.DataFrame, by_lesion: bool) -> None:
    """A class needs at least one unit (lesion, or image) per split before any strategy can place it."""
    units = meta.groupby("dx")["lesion_id"].nunique() if by_lesion else meta["dx"].value_counts()
    unit = "lesions" if by_lesion else "images"
    for dx, n in sorted(units.items()):
        if n < len(SPLITS):
            raise StageError(f"class {dx!r} has only {n} {unit}: too few to appear in train, val and test")


def check_every_class_in_every_split(meta: pd.DataFrame, split: pd.Series) -> None:
    counts = pd.crosstab(meta["dx"], split).reindex(columns=list(SPLITS), fill_value=0)
    for dx, row in counts.iterrows():
        empty = [s for s in SPLITS if row[s] == 0]
        if empty:
            raise StageError(
                f"class {dx!r} ({int(row.sum())} images, {meta.loc[meta['dx'] == dx, 'lesion_id'].nunique()} "
                f"lesions) is too small to appear in all three splits: none in {empty}"
            )


def lesion_leakage(frames: dict[str, pd.DataFrame]) -> dict:
    """Lesion overlap measured on the split tables themselves (set intersections), not assumed.

    `lesions_in_several_splits`: lesion_ids found in more than one split; `pairs`: overlap per pair;
    `images_sharing_lesion_with_train`: val/test images whose lesion also has images in train.
    """
    lesions = {name: set(frame["lesion_id"]) for name, frame in frames.items()}
    names = list(frames)
    pairs = {f"{a}-{b}": len(lesions[a] & lesions[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    several = {lesion for i, a in enumerate(names) for b in names[i + 1 :] for lesion in lesions[a] & lesions[b]}
    train = lesions.get("train", set())
    return {
        "lesions_in_several_splits": len(several),
        "pairs": pairs,
        "images_sharing_lesion_with_train": {
            name: int(frame["lesion_id"].isin(train).sum()) for name, frame in frames.items() if name != "train"
        },
        "examples": sorted(several)[:5],
    }


def class_table(frames: dict[str, pd.DataFrame], classes: Sequence[str]) -> pd.DataFrame:
    """Images per (split, class), with an `all` row; columns in class order."""
    table = pd.DataFrame(
        {name: frame["dx"].value_counts().reindex(list(classes), fill_value=0) for name, frame in frames.items()}
    ).T
    table.loc["all"] = table.sum()
    return table.astype(int)
