"""The Random Forest baseline on real 28 px images, and the features it is fitted on."""

from __future__ import annotations

import io

import joblib
import numpy as np
import pandas as pd
import pytest
from dermaops.dataset import Dataset
from dermaops.features import GRID, HIST_BINS, feature_names, image_features
from dermaops.imagecache import load_images
from dermaops.stage import Context
from dermaops.stages.train_baseline import predict_proba
from dermaops.store import S3Uri


def test_features_describe_colour_and_layout():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 24, 24, 3), dtype=np.uint8)
    features = image_features(images)
    assert features.shape == (5, len(feature_names())) and features.dtype == np.float32
    np.testing.assert_array_equal(features, image_features(images))  # deterministic
    # Each channel's histogram is a distribution over its bins.
    hist = features[:, : 3 * HIST_BINS].reshape(5, 3, HIST_BINS)
    assert np.allclose(hist.sum(axis=2), 1)
    # The downsampled grid is the area average: 24 px -> 3x3 blocks.
    pixels = features[:, -GRID * GRID * 3 :].reshape(5, GRID, GRID, 3)
    blocks = images.reshape(5, GRID, 3, GRID, 3, 3).mean(axis=(2, 4)) / 255
    assert np.allclose(pixels, blocks, atol=1e-6)
    # Pure red vs pure blue: different hue direction, same saturation and value.
    red = np.zeros((1, 16, 16, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((1, 16, 16, 3), np.uint8)
    blue[..., 2] = 255
    names = feature_names()
    f_red, f_blue = image_features(red)[0], image_features(blue)[0]
    assert f_red[names.index("hue_cos")] == pytest.approx(1) and f_blue[names.index("hue_cos")] == pytest.approx(-0.5)
    assert f_red[names.index("sat_mean")] == f_blue[names.index("sat_mean")] == pytest.approx(1)
    with pytest.raises(ValueError, match="smaller than the 8x8 grid"):
        image_features(np.zeros((1, 4, 4, 3), np.uint8))


def test_baseline_trains_and_reports_validation_metrics(small_split, run_stage, bucket, store, tmp_path):
    split = S3Uri.parse(small_split["split_uri"])
    out = f"s3://{bucket.bucket}/runs/r1/models/baseline"
    argv = ["train_baseline", "--split", str(split), "--out", out, "--n-estimators", "60", "--seed", "3"]
    summary = run_stage(*argv).summary

    train = pd.read_csv(io.BytesIO(store.get_bytes(split.join("train.csv"))))
    val = pd.read_csv(io.BytesIO(store.get_bytes(split.join("val.csv"))))
    assert summary["status"] == "done" and summary["n_train"] == len(train) and summary["n_val"] == len(val)
    assert summary["feature_dim"] == len(feature_names())
    metrics = store.get_json(f"{out}/metrics.json")
    assert metrics["split"] == "val" and metrics["n"] == len(val)
    assert sum(c["support"] for c in metrics["per_class"].values()) == len(val)
    assert summary["val_macro_f1"] == round(metrics["macro_f1"], 4)
    # Seven roughly balanced classes: guessing scores about 0.14; colour features do clearly better.
    assert metrics["accuracy"] > 0.2 and metrics["macro_auc"] > 0.6

    # The stored model is the one that was scored: re-scoring it gives the reported figures.
    bundle = joblib.load(store.download(summary["model_uri"], tmp_path / "baseline.joblib"))
    assert bundle["meta"]["image_size"] == 28 and bundle["meta"]["params"]["class_weight"] == "balanced"
    dataset = Dataset.open(store, small_split["dataset_uri"], tmp_path)
    images = load_images(Context(store, tmp_path), dataset, 28).rows(val["image_id"].tolist())
    proba = predict_proba(bundle["model"], image_features(images), 7)
    assert np.isclose((proba.argmax(axis=1) == val["label"].to_numpy()).mean(), metrics["accuracy"])

    assert run_stage(*argv).summary["status"] == "skipped"
    unweighted = run_stage(*argv, "--class-weight", "none").summary
    assert unweighted["status"] == "done"
    assert store.get_json(f"{out}/metrics.json")["params"]["class_weight"] == "none"


def test_baseline_bad_flags_fail_in_one_line(small_split, run_stage, bucket, store):
    out = f"s3://{bucket.bucket}/runs/r1/models/baseline"
    missing = run_stage("train_baseline", "--split", f"s3://{bucket.bucket}/nope/split", "--out", out, check=False)
    assert missing.returncode == 2 and "no finished split at s3://" in missing.error_line
    assert len([line for line in missing.stderr.splitlines() if line.strip()]) == 1

    trees = run_stage(
        "train_baseline", "--split", small_split["split_uri"], "--out", out, "--n-estimators", "0", check=False
    )
    assert trees.returncode == 2 and "--n-estimators must be 1..5000, got 0" in trees.error_line

    weight = run_stage(
        "train_baseline", "--split", small_split["split_uri"], "--out", out, "--class-weight", "auto", check=False
    )
    assert weight.returncode == 2 and "invalid choice: 'auto'" in weight.error_line
    assert list(store.list(f"s3://{bucket.bucket}/")) == []
