"""Evaluate the trained CNN on the held-out test split, explain it, compare it, and run the
champion/challenger gate.

Reads the split (--split), the train stage's output (--model: cnn.pt = best fine-tuned checkpoint,
cnn_phase1.pt = best frozen-backbone checkpoint) and optionally the baseline (--baseline). Writes to
--out (s3://<bucket>/runs/<run_id>/evaluation):

    metrics.json                       every figure below, plus the promotion decision
    per_class.csv                      precision, recall, F1, one-vs-rest AUC, support per class
    confusion_matrix.png               counts (rows = true class)
    confusion_matrix_normalized.png    row-normalised (diagonal = per-class recall)
    gradcam_mel.png                    Grad-CAM of the melanoma score over the last conv block
    model_comparison.csv               baseline vs frozen (phase 1) vs fine-tuned
    report.md                          all of it, with the plots linked
    manifest.json                      written last

With --registry, the gate of dermaops.promotion decides whether this model replaces the champion
(re-scored on this same test split) and records the decision in the registry's history.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from dermaops.errors import StageError
from dermaops.promotion import PRIMARY_METRICS
from dermaops.stage import download_verified, fingerprint, read_manifest, skipped
from dermaops.store import S3Uri

HELP = "test-split metrics, confusion matrices, Grad-CAM, model comparison, champion/challenger promotion"
# Bump when what evaluate computes changes: part of the fingerprint, so a re-run recomputes.
EVALUATION_VERSION = 2
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--split", required=True, help="split output prefix (s3://<b>/runs/<run_id>/split)")
    parser.add_argument("--model", required=True, help="train output prefix (s3://<b>/runs/<run_id>/models/cnn)")
    parser.add_argument(
        "--baseline", default=None, help="train_baseline output prefix (s3://<b>/runs/<run_id>/models/baseline)"
    )
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/evaluation)")
    parser.add_argument(
        "--registry",
        default=None,
        help="model registry prefix (s3://<b>/registry/ham10000); without it the promotion gate is not run",
    )
    parser.add_argument(
        "--primary-metric", choices=PRIMARY_METRICS, default="macro_f1", help="metric the challenger must improve"
    )
    parser.add_argument(
        "--promotion-margin",
        type=float,
        default=0.005,
        help="the challenger must beat the re-scored champion's primary metric by more than this; on the 1,000-image "
        "lesion-grouped test split one more correct df image (of 11) moves macro F1 by about 0.004, so 0.005 asks "
        "for more than a single rare-image flip",
    )
    parser.add_argument(
        "--mel-recall-floor",
        type=float,
        default=0.5,
        help="minimum melanoma recall on the test split for any promotion (the seed model reached 0.55; "
        "below 0.5 the model misses most melanomas)",
    )
    parser.add_argument(
        "--min-macro-f1",
        type=float,
        default=0.25,
        help="absolute floor on test macro F1 for any promotion, the first champion's included (the lesion-grouped "
        "quick recipe reaches about 0.43; a model that calls everything one class scores under 0.1); 0 = off",
    )
    parser.add_argument(
        "--min-macro-auc",
        type=float,
        default=0.75,
        help="absolute floor on test macro one-vs-rest AUC for any promotion (0.5 = chance; the quick recipe "
        "reaches about 0.9); 0 = off",
    )
    parser.add_argument(
        "--allow-subset-promotion",
        action="store_true",
        help="allow promoting a model trained on a --max-train-images subset (never done otherwise)",
    )
    parser.add_argument(
        "--allow-broken-champion-override",
        action="store_true",
        help="when the registry's champion cannot be loaded (missing, corrupt, unreadable record), judge this model "
        "as if there were no champion instead of failing (logged, and recorded in the decision)",
    )
    parser.add_argument("--gradcam-images", type=int, default=8, help="melanoma test images in the Grad-CAM grid")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="test-time augmentation: average the softmax over the 8 flips/quarter turns of each image (every "
        "one is a valid view of a dermatoscopic image and training augments with them); applied alike to the "
        "challenger, the frozen model and the re-scored champion",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="inference batch size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="inference device")
    parser.add_argument(
        "--run-id",
        default=None,
        help="run id recorded with the promotion decision (default: <run_id> of s3://<b>/runs/<run_id>/evaluation)",
    )


def run_id_from(out: S3Uri) -> str:
    parts = out.key.split("/")
    if "runs" in parts[:-1]:
        return parts[parts.index("runs") + 1]
    raise StageError(f"cannot derive a run id from --out {out} (not under runs/<run_id>/); pass --run-id")


def _validate(args) -> None:
    if args.promotion_margin < 0:
        raise StageError(f"--promotion-margin must be >= 0 (got {args.promotion_margin})")
    for flag, value in (
        ("--mel-recall-floor", args.mel_recall_floor),
        ("--min-macro-f1", args.min_macro_f1),
        ("--min-macro-auc", args.min_macro_auc),
    ):
        if not 0 <= value <= 1:  # also refuses nan
            raise StageError(f"{flag} must be between 0 and 1 (got {value})")
    if not 1 <= args.gradcam_images <= 64:
        raise StageError(f"--gradcam-images must be between 1 and 64 (got {args.gradcam_images})")
    if args.batch_size < 1:
        raise StageError(f"--batch-size must be >= 1 (got {args.batch_size})")


def _model_file(manifest: dict, prefix: S3Uri, name: str, required: bool = True) -> S3Uri | None:
    if name in manifest.get("files", {}):
        return prefix.join(name)
    if required:
        raise StageError(f"train output {prefix} has no {name} (files: {sorted(manifest.get('files', {}))})")
    return None


def training_subset(model_manifest: dict, split_manifest: dict) -> str | None:
    """How the model's training set was cut down (`--max-train-images`), or None for the whole split."""
    cap = (model_manifest.get("config") or {}).get("max_train_images")
    n_train = (model_manifest.get("summary") or {}).get("n_train")
    full = ((split_manifest.get("summary") or {}).get("counts") or {}).get("train")
    if cap is None or (n_train is not None and full is not None and n_train >= full):
        return None
    return f"max_train_images={cap}: {n_train} of {full} training images"


def run(args, ctx) -> dict:
    _validate(args)
    split_uri, model_prefix, out_uri = S3Uri.parse(args.split), S3Uri.parse(args.model), S3Uri.parse(args.out)
    baseline_prefix = S3Uri.parse(args.baseline) if args.baseline else None
    registry_uri = S3Uri.parse(args.registry) if args.registry else None
    run_id = args.run_id or run_id_from(out_uri)

    split_manifest = read_manifest(ctx.store, split_uri, "split")
    model_manifest = read_manifest(ctx.store, model_prefix, "train output")
    baseline_manifest = read_manifest(ctx.store, baseline_prefix, "baseline") if baseline_prefix else None
    cnn_uri = _model_file(model_manifest, model_prefix, "cnn.pt")
    phase1_uri = _model_file(model_manifest, model_prefix, "cnn_phase1.pt", required=False)
    baseline_uri = _model_file(baseline_manifest, baseline_prefix, "baseline.joblib") if baseline_manifest else None
    dataset_uri = split_manifest.get("summary", {}).get("dataset_uri")
    if not dataset_uri:
        raise StageError(f"split manifest at {split_uri} has no summary.dataset_uri")

    out = ctx.output(
        out_uri,
        "evaluate",
        fingerprint(
            version=EVALUATION_VERSION,
            split=[str(split_uri), split_manifest["fingerprint"]],
            model=[str(model_prefix), model_manifest["fingerprint"]],
            baseline=[str(baseline_prefix), baseline_manifest["fingerprint"]] if baseline_manifest else None,
            registry=str(registry_uri) if registry_uri else None,
            primary_metric=args.primary_metric,
            margin=args.promotion_margin,
            floor=args.mel_recall_floor,
            floors=[args.min_macro_f1, args.min_macro_auc, args.allow_subset_promotion],
            override=args.allow_broken_champion_override,
            gradcam_images=args.gradcam_images,
            run_id=run_id,
            tta=args.tta,
        ),
    )
    if (manifest := out.finished()) and not args.force:
        log.info("evaluation at %s is finished for these inputs; skipping (use --force to redo)", out_uri)
        return skipped(manifest)

    from dermaops.dataset import Dataset
    from dermaops.models import pick_device
    from dermaops.report import BASELINE, FINE_TUNED, FROZEN
    from dermaops.stages.train_baseline import read_split_csv

    device = pick_device(args.device)
    test = read_split_csv(ctx.store, split_uri, "test", split_manifest)
    dataset = Dataset.open(ctx.store, dataset_uri, ctx.scratch)
    scorer = SplitScorer(ctx, dataset, test, args.batch_size, device, args.tta)

    local = ctx.scratch / "evaluate"
    # Every file is checked against the manifest read above: never a model another run wrote since.
    cnn_path = download_verified(ctx.store, model_prefix, "cnn.pt", local / "cnn.pt", model_manifest)
    model, meta, proba = scorer.score_checkpoint(cnn_path, what=str(cnn_uri))
    models = {}
    if baseline_uri:
        baseline_path = download_verified(
            ctx.store, baseline_prefix, "baseline.joblib", local / "b.joblib", baseline_manifest
        )
        models[BASELINE] = scorer.score_baseline(baseline_path)
    if phase1_uri:
        phase1_path = download_verified(ctx.store, model_prefix, "cnn_phase1.pt", local / "p1.pt", model_manifest)
        _, _, phase1_proba = scorer.score_checkpoint(phase1_path, str(phase1_uri))
        models[FROZEN] = scorer.metrics(phase1_proba)
    metrics = scorer.metrics(proba)
    models[FINE_TUNED] = metrics
    ablation = scorer.ablation(model, meta)
    log.info(
        "test: accuracy %.4f, balanced %.4f, macro F1 %.4f, weighted F1 %.4f, macro AUC %s, mel recall %.4f",
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        metrics["macro_f1"],
        metrics["weighted_f1"],
        metrics["macro_auc"],
        metrics["per_class"]["mel"]["recall"],
    )

    out.unpublish()
    from dermaops.metrics import confusion_counts, row_normalised
    from dermaops.report import comparison_row, draw_confusion, per_class_rows, render, to_csv

    confusion = confusion_counts(scorer.labels, proba.argmax(axis=1))
    plots = local / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    draw_confusion(plots / "cm.png", confusion, "Confusion matrix (counts)", normalised=False)
    draw_confusion(plots / "cmn.png", row_normalised(confusion), "Confusion matrix (row-normalised)", normalised=True)
    out.put_file("confusion_matrix.png", plots / "cm.png", content_type="image/png")
    out.put_file("confusion_matrix_normalized.png", plots / "cmn.png", content_type="image/png")
    gradcam = explain_melanomas(scorer, model, meta, proba, args.gradcam_images, plots / "gradcam.png", device)
    if gradcam:
        out.put_file("gradcam_mel.png", plots / "gradcam.png", content_type="image/png")
    out.put_text("per_class.csv", to_csv(per_class_rows(metrics)), "text/csv")
    out.put_text("model_comparison.csv", to_csv([comparison_row(n, m) for n, m in models.items()]), "text/csv")

    promotion = None
    if registry_uri:
        from dermaops.promotion import Challenger, Floors, Registry, run_gate

        challenger = Challenger(
            run_id=run_id,
            checkpoint=cnn_path,
            source_uri=str(cnn_uri),
            metrics=metrics,
            meta=meta,
            dataset_version=dataset.version,
            split_uri=str(split_uri),
        )
        promotion = run_gate(
            Registry(ctx.store, registry_uri),
            challenger,
            scorer.score_champion,
            args.primary_metric,
            args.promotion_margin,
            Floors(args.mel_recall_floor, args.min_macro_f1, args.min_macro_auc, args.allow_subset_promotion),
            local,
            baseline=models.get(BASELINE),
            subset=training_subset(model_manifest, split_manifest),
            allow_broken_champion=args.allow_broken_champion_override,
        )

    report = render(
        run_id=run_id,
        dataset_version=dataset.version,
        split_uri=str(split_uri),
        split_strategy=split_manifest["summary"].get("strategy", "unknown"),
        model_uri=str(cnn_uri),
        model_meta=meta,
        models=models,
        confusion=confusion,
        gradcam=gradcam,
        promotion=promotion,
    )
    out.put_json(
        "metrics.json",
        {
            "run_id": run_id,
            "dataset_version": dataset.version,
            "split_uri": str(split_uri),
            "model_uri": str(cnn_uri),
            "model_meta": {k: meta.get(k) for k in ("arch", "image_size", "stem", "phase", "epoch")},
            "classes": list(scorer.classes),
            "test": metrics,
            "confusion_matrix": confusion.tolist(),
            "confusion_matrix_normalized": row_normalised(confusion).round(4).tolist(),
            "comparison": models,
            "gradcam": gradcam,
            "promotion": promotion,
            "inference": {"tta": args.tta, "logit_adjustment": meta.get("logit_adjustment")},
            "ablation": ablation,
        },
    )
    report_uri = out.put_text("report.md", report, "text/markdown; charset=utf-8")
    summary = {
        "accuracy": round(metrics["accuracy"], 4),
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "weighted_f1": round(metrics["weighted_f1"], 4),
        "macro_auc": round(metrics["macro_auc"], 4) if metrics["macro_auc"] is not None else None,
        "mel_recall": round(metrics["per_class"]["mel"]["recall"], 4),
        "n_test": metrics["n"],
        "tta": args.tta,
        "ablation": ablation,
        "run_id": run_id,
        "dataset_version": dataset.version,
        "promoted": bool(promotion and promotion["promoted"]),
        "decision": promotion["decision"] if promotion else "not_run",
        "promotion_reason": promotion["reason"] if promotion else "no --registry given",
        "champion_uri": promotion["champion_uri"] if promotion else None,
        "metrics_uri": str(out.uri("metrics.json")),
        "report_uri": str(report_uri),
    }
    out.publish(summary)
    return summary


class SplitScorer:
    """Scores models on one test split; images are loaded once per image size (the champion or the
    baseline may use another size than the challenger)."""

    def __init__(self, ctx, dataset, test, batch_size: int, device: str, tta: bool = True):
        from dermaops.dataset import CLASSES

        self.ctx, self.dataset, self.test = ctx, dataset, test
        self.batch_size, self.device, self.tta = batch_size, device, tta
        self.classes = CLASSES
        self.labels = test["label"].to_numpy()
        self.image_ids = test["image_id"].tolist()
        self._images: dict[int, object] = {}

    def images(self, size: int):
        if size not in self._images:
            from dermaops.imagecache import load_images

            self._images[size] = load_images(self.ctx, self.dataset, size).rows(self.image_ids)
        return self._images[size]

    def metrics(self, proba) -> dict:
        from dermaops.metrics import classification_metrics

        return classification_metrics(self.labels, proba.argmax(axis=1), proba, self.classes)

    def score_checkpoint(self, path: Path, what: str):
        """(model, meta, test probabilities) of a checkpoint; StageError if it is not one of ours or
        predicts other classes."""
        from dermaops.models import load_checkpoint, predict_proba

        model, meta = load_checkpoint(path, device=self.device)
        if list(meta.get("classes", [])) != list(self.classes):
            raise StageError(f"{what} predicts classes {meta.get('classes')}, expected {list(self.classes)}")
        images = self.images(meta["image_size"])
        started = time.monotonic()
        # One log line per model scored keeps the container's log alive (Docker log streaming).
        log.info("scoring %s (%s, %d px) on %d test images", what, meta["arch"], meta["image_size"], len(images))
        proba = predict_proba(model, images, meta, self.batch_size, self.device, tta=self.tta)
        log.info("scored %s in %.1f s", what, time.monotonic() - started)
        require_finite(proba, what)
        return model, meta, proba

    def ablation(self, model, meta) -> dict:
        """Headline test metrics of the model with each inference-time component switched off in turn
        (test-time augmentation; the logit adjustment, when the checkpoint has one): what each contributes."""
        from dermaops.models import predict_proba

        images = self.images(meta["image_size"])
        variants = {"tta_on" if not self.tta else "tta_off": {"tta": not self.tta}}
        if meta.get("logit_bias") is not None:
            variants["logit_adjustment_off"] = {"tta": self.tta, "adjust": False}
        out = {}
        for name, kwargs in variants.items():
            m = self.metrics(predict_proba(model, images, meta, self.batch_size, self.device, **kwargs))
            out[name] = {
                "accuracy": round(m["accuracy"], 4),
                "macro_f1": round(m["macro_f1"], 4),
                "macro_auc": round(m["macro_auc"], 4) if m["macro_auc"] is not None else None,
                "mel_recall": round(m["per_class"]["mel"]["recall"], 4),
            }
        return out

    def score_champion(self, path: Path) -> dict:
        """Test metrics of the registered champion. Any failure to rebuild it (architecture or tensor
        shapes its meta does not match) is a StageError: the gate then treats it as no champion."""
        try:
            return self.metrics(self.score_checkpoint(path, what="the champion checkpoint")[2])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise StageError(f"the champion checkpoint does not load ({type(exc).__name__}: {exc})") from exc

    def score_baseline(self, path: Path) -> dict:
        import joblib

        from dermaops.features import FEATURE_VERSION, image_features
        from dermaops.stages.train_baseline import predict_proba

        bundle = joblib.load(path)
        meta = bundle["meta"]
        if meta.get("feature_version") != FEATURE_VERSION or list(meta.get("classes", [])) != list(self.classes):
            raise StageError(
                f"the baseline was fitted on feature version {meta.get('feature_version')} / classes "
                f"{meta.get('classes')}; this code computes version {FEATURE_VERSION} / {list(self.classes)}: "
                "retrain it"
            )
        log.info(
            "scoring the baseline (random forest, %d px features) on %d test images", meta["image_size"], len(self.test)
        )
        features = image_features(self.images(meta["image_size"]))
        return self.metrics(predict_proba(bundle["model"], features, len(self.classes)))


def require_finite(proba, what: str) -> None:
    """A model whose outputs are NaN/inf (a diverged training) is refused with one line instead of being
    scored: argmax of NaN is class 0 and would give it a plausible-looking accuracy."""
    import numpy as np

    bad = ~np.isfinite(proba).all(axis=1)
    if bad.any():
        raise StageError(
            f"{what} gives non-finite outputs (NaN/inf) for {int(bad.sum())} of {len(proba)} test images: "
            "its training diverged; refusing to score it"
        )


def explain_melanomas(scorer: SplitScorer, model, meta, proba, count: int, path: Path, device: str) -> dict | None:
    """Grad-CAM grid of the `mel` score for up to `count` melanoma test images; None if there are none."""
    import numpy as np

    from dermaops.gradcam import draw_grid, gradcam, pick_spread
    from dermaops.models import target_layer

    mel = scorer.classes.index("mel")
    candidates = np.flatnonzero(scorer.labels == mel)
    if len(candidates) == 0:
        log.warning("no melanoma image in the test split: no Grad-CAM grid")
        return None
    chosen = candidates[pick_spread(proba[candidates, mel], count)]
    images = scorer.images(meta["image_size"])[chosen]
    layer = target_layer(model)
    cam = gradcam(model, layer, images, meta, mel, device)
    ids = [scorer.image_ids[i] for i in chosen]
    predicted = [scorer.classes[i] for i in proba[chosen].argmax(axis=1)]
    titles = [
        f"{image_id}\npred {pred}, p(mel) {p_mel:.2f}" + ("" if evidence > 0 else "\nno positive mel evidence")
        for image_id, pred, p_mel, evidence in zip(
            ids, predicted, cam.target_proba, cam.raw.max(axis=(1, 2)), strict=True
        )
    ]
    draw_grid(path, images, cam.heatmaps, titles)
    return {
        "image_ids": ids,
        "predicted": predicted,
        "p_mel": [round(float(q), 4) for q in cam.target_proba],
        "layer": next(name for name, module in model.named_modules() if module is layer),
        "map_size": list(cam.raw.shape[1:]),
    }
