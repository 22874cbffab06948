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

import logging

from dermaops.baseline import fit_and_score, predict_proba
from dermaops.config import BaselineConfig
from dermaops.errors import StageError
from dermaops.stage import Context, StageIO, fingerprint, read_manifest, skipped
from dermaops.store import S3Uri

HELP = "Random Forest baseline on colour/texture features (the floor the CNN must beat)"
CONFIG = BaselineConfig
__all__ = ["CONFIG", "HELP", "add_arguments", "predict_proba", "run"]  # predict_proba: see dermaops.baseline
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """The input and output locations; the settings come from CONFIG (dermaops.config.BaselineConfig)."""
    parser.add_argument("--split", required=True, help="split output prefix (s3://<b>/runs/<run_id>/split)")
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/models/baseline)")


def run(stage_io: StageIO, cfg: BaselineConfig, ctx: Context) -> dict:
    split_uri = S3Uri.parse(stage_io.inputs["split"])
    out_uri = S3Uri.parse(stage_io.out)
    split_manifest = read_manifest(ctx.store, split_uri, "split")
    from dermaops.features import FEATURE_VERSION

    params = cfg.fingerprint_inputs()
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
    if (manifest := out.finished()) and not stage_io.force:
        log.info("baseline at %s is finished for these inputs; skipping (use --force to retrain)", out_uri)
        return skipped(manifest)

    from dermaops.dataset import Dataset

    summary_in = split_manifest.get("summary", {})
    if "dataset_uri" not in summary_in:
        raise StageError(f"split manifest at {split_uri} has no summary.dataset_uri")
    from dermaops.split_files import read_split_csv

    train = read_split_csv(ctx.store, split_uri, "train", split_manifest)
    val = read_split_csv(ctx.store, split_uri, "val", split_manifest)
    dataset = Dataset.open(ctx.store, summary_in["dataset_uri"], ctx.scratch)

    from dermaops.frame import Frame
    from dermaops.imagecache import load_images

    cache = load_images(ctx, dataset, Frame(cfg.geometry, cfg.image_size))
    model, meta, metrics, seconds = fit_and_score(cache, train, val, params, cfg.n_jobs)

    import joblib

    from dermaops.metrics import headline

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
        **{f"val_{k}": v for k, v in headline(metrics, ("macro_f1", "accuracy", "mel_recall")).items()},
        "feature_dim": meta["feature_dim"],
        "n_train": len(train),
        "n_val": len(val),
        "dataset_version": dataset.version,
    }
    out.publish(summary)
    return summary
