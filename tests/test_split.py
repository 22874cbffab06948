"""The split stage on real HAM10000 metadata: lesion-grouped, stratified, deterministic; the image-level
and official DermaMNIST splits for comparison, with their lesion leakage measured.

Algorithm tests read the real 28 px metadata directly; stage tests run `python -m dermaops split` on
a dataset version published by the real ingest, against the loopback S3.
"""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest
from dermaops.dataset import CLASSES
from dermaops.errors import StageError
from dermaops.splitting import (
    SPLITS,
    check_enough_per_class,
    check_every_class_in_every_split,
    lesion_split,
    lesion_strata,
    mixed_dx_lesions,
    parse_fractions,
)
from dermaops.stage import CLAIM, read_manifest
from dermaops.store import S3Uri

FRACTIONS = (0.8, 0.1, 0.1)
TARGET = dict(zip(SPLITS, FRACTIONS, strict=True))
COLUMNS = ["image_id", "lesion_id", "dx", "label", "dx_type", "age", "sex", "localization"]
SPLIT_FILES = {"train.csv", "val.csv", "test.csv", "split_report.md", "split_report.json", "manifest.json"}
# The official DermaMNIST split per class, from ../shared/data/README.md.
DERMAMNIST_COUNTS = {
    "train": {"akiec": 228, "bcc": 359, "bkl": 769, "df": 80, "mel": 779, "nv": 4693, "vasc": 99},
    "val": {"akiec": 33, "bcc": 52, "bkl": 110, "df": 12, "mel": 111, "nv": 671, "vasc": 14},
    "test": {"akiec": 66, "bcc": 103, "bkl": 220, "df": 23, "mel": 223, "nv": 1341, "vasc": 29},
}


@pytest.fixture(scope="module")
def metadata(pack_28px) -> pd.DataFrame:
    return pd.read_csv(pack_28px / "HAM10000_metadata.csv")


def lesion_sets(frames: dict[str, pd.DataFrame]) -> dict[str, set]:
    return {name: set(frame["lesion_id"]) for name, frame in frames.items()}


def shared_lesions(frames: dict[str, pd.DataFrame]) -> set:
    sets = lesion_sets(frames)
    return (sets["train"] & sets["val"]) | (sets["train"] & sets["test"]) | (sets["val"] & sets["test"])


def assert_stratified(frames: dict[str, pd.DataFrame]) -> None:
    """Every class within 1 percentage point of 80/10/10, counted in images."""
    counts = pd.DataFrame({name: frame["dx"].value_counts() for name, frame in frames.items()}).fillna(0)
    fractions = counts.div(counts.sum(axis=1), axis=0)
    for dx in CLASSES:
        for name in SPLITS:
            assert abs(fractions.at[dx, name] - TARGET[name]) <= 0.01, (dx, name, fractions.loc[dx].to_dict())


def read_tables(store, prefix: str) -> dict[str, pd.DataFrame]:
    root = S3Uri.parse(prefix)
    return {name: pd.read_csv(io.BytesIO(store.get_bytes(root.join(f"{name}.csv")))) for name in SPLITS}


def snapshot(store, prefix: str) -> dict[str, bytes]:
    return {uri.key: store.get_bytes(uri) for uri, _ in store.list(prefix)}


# -- the algorithm, on the real metadata ------------------------------------------------------


def test_lesion_split_is_grouped_stratified_and_complete(metadata):
    split = lesion_split(metadata, FRACTIONS, seed=42)
    assert len(split) == len(metadata) == 10_015 and split.index.equals(metadata.index)
    assert split.notna().all() and set(split) == set(SPLITS)
    frames = {name: metadata[split == name] for name in SPLITS}
    assert shared_lesions(frames) == set()
    assert_stratified(frames)


def test_lesion_split_depends_on_the_seed_only(metadata):
    first = lesion_split(metadata, FRACTIONS, seed=42)
    assert first.equals(lesion_split(metadata, FRACTIONS, seed=42))
    other = lesion_split(metadata, FRACTIONS, seed=7)
    assert (first != other).sum() > 1000
    assert_stratified({name: metadata[other == name] for name in SPLITS})


def test_a_lesion_with_mixed_dx_stays_whole_and_takes_its_majority_class(metadata):
    assert mixed_dx_lesions(metadata) == [], "the real HAM10000 metadata has one dx per lesion"
    sizes = metadata[metadata["dx"] == "bkl"].groupby("lesion_id").size()
    lesion = sizes[sizes == 3].index[0]
    relabelled = metadata.copy()
    relabelled.loc[relabelled.index[relabelled["lesion_id"] == lesion][0], "dx"] = "mel"

    assert mixed_dx_lesions(relabelled) == [lesion]
    assert lesion_strata(relabelled)[lesion] == "bkl"
    split = lesion_split(relabelled, FRACTIONS, seed=42)
    assert split[relabelled["lesion_id"] == lesion].nunique() == 1


def test_a_class_with_three_lesions_reaches_every_split_and_fewer_is_named(metadata):
    singles = metadata[metadata["dx"] == "df"].groupby("lesion_id").filter(lambda g: len(g) == 1)["lesion_id"]
    three = metadata[(metadata["dx"] != "df") | metadata["lesion_id"].isin(sorted(set(singles))[:3])]
    check_enough_per_class(three, by_lesion=True)
    split = lesion_split(three, FRACTIONS, seed=42)
    assert sorted(split[three["dx"] == "df"]) == ["test", "train", "val"]

    two = metadata[(metadata["dx"] != "df") | metadata["lesion_id"].isin(sorted(set(singles))[:2])]
    with pytest.raises(StageError, match=r"class 'df' has only 2 lesions: too few to appear in train, val and test"):
        check_enough_per_class(two, by_lesion=True)


def test_a_split_missing_a_class_is_named(metadata, pack_28px):
    official = pd.read_csv(pack_28px / "dermamnist_splits.csv").set_index("image_id")["dermamnist_split"]
    split = metadata["image_id"].map(official)
    split[(metadata["dx"] == "vasc") & (split == "test")] = "train"
    with pytest.raises(StageError, match=r"class 'vasc' \(142 images, \d+ lesions\) .* none in \['test'\]"):
        check_every_class_in_every_split(metadata, split)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.8,0.2", "expected 3 comma-separated numbers"),
        ("0.8,0.1,0.1,0", "expected 3 comma-separated numbers"),
        ("a,b,c", "not numbers"),
        ("1,0,0", "every fraction must be > 0"),
        ("1.2,-0.1,-0.1", "every fraction must be > 0"),
        ("nan,0.5,0.5", "every fraction must be > 0"),
        ("0.8,0.1,0.2", "fractions must sum to 1"),
    ],
)
def test_bad_fractions_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_fractions(text)
    assert parse_fractions(" 0.7, 0.1 ,0.2") == (0.7, 0.1, 0.2)


# -- the stage, end to end --------------------------------------------------------------------


def test_lesion_split_stage_writes_checked_tables_and_report(run_stage, store, bucket, dataset_28px, metadata):
    out = f"s3://{bucket.bucket}/runs/r1/split"
    summary = run_stage("split", "--dataset", dataset_28px["dataset_uri"], "--out", out).summary

    assert summary["status"] == "done" and summary["strategy"] == "lesion" and summary["seed"] == 42
    assert summary["split_uri"] == out and summary["dataset_uri"] == dataset_28px["dataset_uri"]
    assert summary["dataset_version"] == dataset_28px["dataset_version"]
    assert summary["lesion_overlap"] == 0
    manifest = read_manifest(store, out, "split")
    assert set(manifest["files"]) | {"manifest.json"} == SPLIT_FILES
    assert manifest["summary"] == {k: v for k, v in summary.items() if k not in ("stage", "status", "seconds")}

    frames = read_tables(store, out)
    assert {name: len(frame) for name, frame in frames.items()} == summary["counts"]
    every = pd.concat(frames.values())
    assert list(every.columns) == COLUMNS
    assert len(every) == 10_015 and sorted(every["image_id"]) == sorted(metadata["image_id"])
    assert (every["label"] == every["dx"].map(CLASSES.index)).all()
    # Rows are the metadata's rows, unchanged.
    merged = every.merge(metadata, on="image_id", suffixes=("", "_meta"))
    for column in ("lesion_id", "dx", "dx_type", "sex", "localization"):
        assert (merged[column] == merged[f"{column}_meta"]).all(), column
    assert shared_lesions(frames) == set()
    assert_stratified(frames)

    report = store.get_json(f"{out}/split_report.json")
    assert report["lesion_overlap"]["lesions_in_several_splits"] == 0
    assert report["class_counts"]["val"] == frames["val"]["dx"].value_counts().reindex(CLASSES, fill_value=0).to_dict()
    markdown = store.get_bytes(f"{out}/split_report.md").decode()
    assert "**0** lesions have images in more than one split" in markdown
    assert f"version `{dataset_28px['dataset_version']}`" in markdown and "Seed: 42" in markdown
    assert "Every class is within 1 point of its target fractions." in markdown


def test_split_is_deterministic_idempotent_and_forced(run_stage, store, bucket, dataset_28px):
    def split(name: str, *flags: str):
        out = f"s3://{bucket.bucket}/runs/{name}/split"
        return out, run_stage("split", "--dataset", dataset_28px["dataset_uri"], "--out", out, *flags).summary

    first, first_summary = split("a")
    tables = {f"{name}.csv": store.get_bytes(f"{first}/{name}.csv") for name in SPLITS}
    same_seed, _ = split("b", "--seed", "42")
    assert {name: store.get_bytes(f"{same_seed}/{name}") for name in tables} == tables
    other_seed, summary = split("c", "--seed", "7")
    assert summary["lesion_overlap"] == 0
    assert store.get_bytes(f"{other_seed}/train.csv") != tables["train.csv"]

    # A finished split is not redone (a tampered file shows it was not rewritten); --force redoes it.
    store.put_bytes(f"{first}/train.csv", b"tampered")
    _, again = split("a")
    assert again["status"] == "skipped" and again["counts"] == first_summary["counts"]
    assert store.get_bytes(f"{first}/train.csv") == b"tampered"
    _, forced = split("a", "--force")
    assert forced["status"] == "done"
    assert store.get_bytes(f"{first}/train.csv") == tables["train.csv"]


def test_image_strategy_leaks_lesions_and_reports_how_many(run_stage, store, bucket, dataset_28px):
    out = f"s3://{bucket.bucket}/runs/r1/split"
    summary = run_stage("split", "--dataset", dataset_28px["dataset_uri"], "--out", out, "--strategy", "image").summary

    frames = read_tables(store, out)
    leaked = shared_lesions(frames)
    assert len(leaked) > 100, "an image-level split of HAM10000 puts images of one lesion in several splits"
    assert summary["strategy"] == "image" and summary["lesion_overlap"] == len(leaked)
    assert sum(summary["counts"].values()) == 10_015
    assert_stratified(frames)
    val_shared = int(frames["val"]["lesion_id"].isin(lesion_sets(frames)["train"]).sum())
    markdown = store.get_bytes(f"{out}/split_report.md").decode()
    assert f"{len(leaked):,} of 7,470 lesions have images in more than one split" in markdown
    assert f"{val_shared:,} of {len(frames['val']):,} val images belong to a lesion that also has images in train" in (
        markdown
    )


def test_dermamnist_strategy_reproduces_the_official_split(run_stage, store, bucket, dataset_28px, pack_28px):
    official = pack_28px / "dermamnist_splits.csv"
    official_s3 = f"s3://{bucket.bucket}/inputs/dermamnist_splits.csv"
    store.put_bytes(official_s3, official.read_bytes())
    for name, source in (("local", str(official)), ("s3", official_s3)):
        out = f"s3://{bucket.bucket}/runs/{name}/split"
        summary = run_stage(
            "split",
            "--dataset",
            dataset_28px["dataset_uri"],
            "--out",
            out,
            "--strategy",
            "dermamnist",
            "--official-splits",
            source,
        ).summary
        assert summary["counts"] == {"train": 7007, "val": 1003, "test": 2005}, name
        assert summary["lesion_overlap"] == 1006, name

    frames = read_tables(store, out)
    table = pd.read_csv(official)
    for split_name, frame in frames.items():
        assert set(frame["image_id"]) == set(table.loc[table["dermamnist_split"] == split_name, "image_id"])
        assert frame["dx"].value_counts().to_dict() == DERMAMNIST_COUNTS[split_name]
    assert len(shared_lesions(frames)) == 1006
    markdown = store.get_bytes(f"{out}/split_report.md").decode()
    assert "1,006 of 7,470 lesions have images in more than one split" in markdown
    assert "348 of 1,003 val images" in markdown and "693 of 2,005 test images" in markdown


def test_bad_input_fails_in_one_line_and_keeps_the_finished_split(
    run_stage, store, bucket, dataset_28px, pack_28px, tmp_path
):
    out = f"s3://{bucket.bucket}/runs/r1/split"
    dataset = dataset_28px["dataset_uri"]
    run_stage("split", "--dataset", dataset, "--out", out)
    before = snapshot(store, out)
    # The published files, and the writer's claim on the prefix (stage.py: one writer per prefix).
    assert {key.rsplit("/", 1)[-1] for key in before} == SPLIT_FILES | {CLAIM}

    official = pd.read_csv(pack_28px / "dermamnist_splits.csv")
    bad_files = {
        "no_split_column.csv": official.drop(columns=["dermamnist_split"]),
        "unknown_id.csv": pd.concat([official, pd.DataFrame([["ISIC_9999999", "train", 0]], columns=official.columns)]),
        "bad_value.csv": official.replace({"dermamnist_split": {"val": "validation"}}),
        "missing_ids.csv": official.iloc[10:],
    }
    for name, frame in bad_files.items():
        frame.to_csv(tmp_path / name, index=False)

    def dermamnist(name: str) -> list[str]:
        return ["--strategy", "dermamnist", "--official-splits", str(tmp_path / name)]

    cases = [
        (["--fractions", "0.8,0.2"], "expected 3 comma-separated numbers"),
        (["--fractions", "0.8,0.1,0.2"], "fractions must sum to 1"),
        (["--fractions", "0.9,-0.1,0.2"], "every fraction must be > 0"),
        (["--strategy", "random"], "invalid choice: 'random'"),
        (["--dataset", f"s3://{bucket.bucket}/datasets/ham10000/nope"], "no finished dataset version"),
        (["--dataset", str(pack_28px)], "not an S3 URI"),
        (["--strategy", "dermamnist"], "needs --official-splits"),
        (["--official-splits", str(pack_28px / "dermamnist_splits.csv")], "only used by --strategy dermamnist"),
        (dermamnist("absent.csv"), "official split file not found"),
        (dermamnist("no_split_column.csv"), "lacks columns ['dermamnist_split']"),
        (dermamnist("unknown_id.csv"), "1 image_ids not in the metadata: ISIC_9999999"),
        (dermamnist("bad_value.csv"), "values ['validation']"),
        (dermamnist("missing_ids.csv"), "lacks 10 metadata image_ids"),
    ]
    for flags, message in cases:
        argv = {"--dataset": dataset, "--out": out}
        for flag, value in zip(flags[::2], flags[1::2], strict=True):
            argv[flag] = value
        result = run_stage("split", *(item for pair in argv.items() for item in pair), check=False)
        assert result.returncode == 2, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (flags, result.stderr)
        assert message in result.error_line, (flags, result.error_line)
        assert result.stdout.strip() == "", flags
    assert snapshot(store, out) == before


def test_help_lists_typed_flags_with_defaults(run_stage):
    text = run_stage("split", "--help").stdout
    for flag in ("--dataset", "--out", "--strategy", "--seed", "--fractions", "--official-splits", "--force"):
        assert flag in text, flag
    assert "{lesion,image,dermamnist}" in text and "default: lesion" in text and "default: 0.8,0.1,0.1" in text
