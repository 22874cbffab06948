"""Train the performance floor: a scikit-learn Random Forest on simple image features.

Features (dermaops.features): per-channel colour histograms, HSV statistics and the image
area-averaged to 8x8 pixels, computed from the dataset's cached images at --image-size. Fits on the
split's train.csv, scores val.csv, and writes to --out (s3://<bucket>/runs/<run_id>/models/baseline):

    baseline.joblib   {"model": RandomForestClassifier, "meta": {classes, image_size, feature_version, ...}}
    metrics.json      validation metrics (accuracy, balanced accuracy, macro/weighted F1, macro AUC, per class)
    manifest.json     written last

The seed report's Random Forest reached macro F1 0.24 and 0.9 % melanoma recall; --class-weight
balanced (the default) is what keeps the rare classes from being ignored.
"""

from __future__ import annotations

import io
import logging
import time

from dermaops.errors import StageError
from dermaops.stage import fingerprint, read_manifest, read_verified, skipped
from dermaops.store import S3Uri

HELP = "Random Forest baseline on colour/texture features (the floor the CNN must beat)"
CLASS_WEIGHTS = ("balanced", "none")
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--split", required=True, help="split output prefix (s3://<b>/runs/<run_id>/split)")
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/models/baseline)")
    parser.add_argument(
        "--class-weight",
        choices=CLASS_WEIGHTS,
        default="balanced",
        help="balanced: weight classes by inverse frequency; none: plain majority-driven fit",
    )
    parser.add_argument("--n-estimators", type=int, default=300, help="number of trees")
    parser.add_argument("--max-depth", type=int, default=None, help="maximum tree depth (default: unlimited)")
    parser.add_argument("--min-samples-leaf", type=int, default=2, help="minimum samples per leaf")
    parser.add_argument("--image-size", type=int, default=28, help="image cache size (px) the features are computed on")
    parser.add_argument("--seed", type=int, default=42, help="random seed of the forest")
    parser.add_argument("--n-jobs", type=int, default=-1, help="parallel tree jobs (-1: all cores)")


def _validate(args) -> None:
    for flag, value, low in (
        ("--n-estimators", args.n_estimators, 1),
        ("--min-samples-leaf", args.min_samples_leaf, 1),
        ("--image-size", args.image_size, 8),
    ):
        if value < low:
            raise StageError(f"{flag} must be >= {low} (got {value})")
    if args.max_depth is not None and args.max_depth < 1:
        raise StageError(f"--max-depth must be >= 1 or left out for unlimited (got {args.max_depth})")
    if args.n_jobs == 0:
        raise StageError("--n-jobs must be a positive count or -1 for all cores (got 0)")


def read_split_csv(store, split_uri: S3Uri, name: str, manifest: dict | None = None):
    """One of the split's CSVs (train/val/test), verified against the split's manifest (given, or read
    now), with its image_id and label columns checked."""
    import pandas as pd

    uri = split_uri.join(f"{name}.csv")
    frame = pd.read_csv(io.BytesIO(read_verified(store, split_uri, f"{name}.csv", manifest)))
    missing = [c for c in ("image_id", "label") if c not in frame.columns]
    if missing:
        raise StageError(f"{uri} lacks columns {missing}")
    if frame.empty:
        raise StageError(f"{uri} has no rows")
    return frame


def run(args, ctx) -> dict:
    _validate(args)
    split_uri = S3Uri.parse(args.split)
    out_uri = S3Uri.parse(args.out)
    split_manifest = read_manifest(ctx.store, split_uri, "split")
    from dermaops.features import FEATURE_VERSION

    params = {
        "class_weight": args.class_weight,
        "n_estimators": args.n_estimators,
        "max_depth": args.max_depth,
        "min_samples_leaf": args.min_samples_leaf,
        "image_size": args.image_size,
        "seed": args.seed,
    }
    out = ctx.output(
        out_uri,
        "train_baseline",
        fingerprint(
            split=str(split_uri),
            split_fingerprint=split_manifest["fingerprint"],
            feature_version=FEATURE_VERSION,
            **params,
        ),
    )
    if (manifest := out.finished()) and not args.force:
        log.info("baseline at %s is finished for these inputs; skipping (use --force to retrain)", out_uri)
        return skipped(manifest)

    from dermaops.dataset import Dataset

    summary_in = split_manifest.get("summary", {})
    if "dataset_uri" not in summary_in:
        raise StageError(f"split manifest at {split_uri} has no summary.dataset_uri")
    train = read_split_csv(ctx.store, split_uri, "train", split_manifest)
    val = read_split_csv(ctx.store, split_uri, "val", split_manifest)
    dataset = Dataset.open(ctx.store, summary_in["dataset_uri"], ctx.scratch)

    from dermaops.imagecache import load_images

    cache = load_images(ctx, dataset, args.image_size)
    model, meta, metrics, seconds = fit_and_score(cache, train, val, params, args.n_jobs)

    import joblib

    path = ctx.scratch / "baseline" / "baseline.joblib"
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump({"model": model, "meta": meta}, path, compress=3)

    out.unpublish()
    model_uri = out.put_file("baseline.joblib", path, content_type="application/octet-stream")
    out.put_json(
        "metrics.json",
        {"split": "val", "dataset_version": dataset.version, "params": params, "fit_seconds": seconds, **metrics},
    )
    summary = {
        "model_uri": str(model_uri),
        "val_macro_f1": round(metrics["macro_f1"], 4),
        "val_accuracy": round(metrics["accuracy"], 4),
        "val_mel_recall": round(metrics["per_class"]["mel"]["recall"], 4),
        "feature_dim": meta["feature_dim"],
        "n_train": len(train),
        "n_val": len(val),
        "dataset_version": dataset.version,
    }
    out.publish(summary)
    return summary


def fit_and_score(cache, train, val, params: dict, n_jobs: int):
    """(fitted forest, its meta, validation metrics, fit seconds)."""
    from sklearn.ensemble import RandomForestClassifier

    from dermaops.dataset import CLASSES
    from dermaops.features import FEATURE_VERSION, feature_names, image_features
    from dermaops.metrics import classification_metrics

    x_train = image_features(cache.rows(train["image_id"].tolist()))
    x_val = image_features(cache.rows(val["image_id"].tolist()))
    log.info("features: %d train x %d, %d val", len(x_train), x_train.shape[1], len(x_val))
    model = RandomForestClassifier(
        n_estimators=params["n_estimators"],
        max_depth=params["max_depth"],
        min_samples_leaf=params["min_samples_leaf"],
        class_weight="balanced" if params["class_weight"] == "balanced" else None,
        random_state=params["seed"],
        n_jobs=n_jobs,
    )
    started = time.monotonic()
    model.fit(x_train, train["label"].to_numpy())
    seconds = round(time.monotonic() - started, 2)
    proba = predict_proba(model, x_val, len(CLASSES))
    metrics = classification_metrics(val["label"].to_numpy(), proba.argmax(axis=1), proba)
    log.info(
        "baseline fitted in %.1f s: val macro F1 %.3f, accuracy %.3f, mel recall %.3f",
        seconds,
        metrics["macro_f1"],
        metrics["accuracy"],
        metrics["per_class"]["mel"]["recall"],
    )
    meta = {
        "classes": list(CLASSES),
        "image_size": params["image_size"],
        "feature_version": FEATURE_VERSION,
        "feature_dim": int(x_train.shape[1]),
        "feature_names": feature_names(),
        "params": params,
    }
    return model, meta, metrics, seconds


def predict_proba(model, features, n_classes: int):
    """(N, n_classes) probabilities: a forest only has columns for the classes it saw while fitting,
    so they are placed in their label positions and the unseen classes get 0."""
    import numpy as np

    proba = np.zeros((len(features), n_classes), dtype=np.float64)
    proba[:, model.classes_.astype(int)] = model.predict_proba(features)
    return proba
