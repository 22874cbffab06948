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

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dermaops.config import EvaluateConfig, recipe_arg
from dermaops.errors import StageError
from dermaops.stage import Output, download_verified, fingerprint, read_manifest, skipped
from dermaops.store import S3Uri

HELP = "test-split metrics, confusion matrices, Grad-CAM, model comparison, champion/challenger promotion"
CONFIG = EvaluateConfig
# Bump when what evaluate computes changes: part of the fingerprint, so a re-run recomputes.
EVALUATION_VERSION = 2
ABLATION_KEYS = ("accuracy", "macro_f1", "macro_auc", "mel_recall")
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    """The input and output locations; the settings come from CONFIG (dermaops.config.EvaluateConfig)."""
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
        "--recipe",
        type=recipe_arg,
        default=None,
        help="the run's recipe params as a JSON object, recorded with the promotion decision (dermaops.freshness "
        "compares the next run's with the champion's)",
    )
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


def training_subset(model_manifest: dict, split_manifest: dict) -> str | None:
    """How the model's training set was cut down (`--max-train-images`), or None for the whole split."""
    cap = (model_manifest.get("config") or {}).get("max_train_images")
    n_train = (model_manifest.get("summary") or {}).get("n_train")
    full = ((split_manifest.get("summary") or {}).get("counts") or {}).get("train")
    if cap is None or (n_train is not None and full is not None and n_train >= full):
        return None
    return f"max_train_images={cap}: {n_train} of {full} training images"


def _model_file(manifest: dict, prefix: S3Uri, name: str, required: bool = True) -> S3Uri | None:
    if name in manifest.get("files", {}):
        return prefix.join(name)
    if required:
        raise StageError(f"train output {prefix} has no {name} (files: {sorted(manifest.get('files', {}))})")
    return None


@dataclass
class Inputs:
    """What evaluate reads, located and checked before anything is computed."""

    run_id: str
    split_uri: S3Uri
    split_manifest: dict
    dataset_uri: str
    model_prefix: S3Uri
    model_manifest: dict
    cnn_uri: S3Uri
    phase1_uri: S3Uri | None
    baseline_prefix: S3Uri | None
    baseline_manifest: dict | None
    baseline_uri: S3Uri | None
    registry_uri: S3Uri | None
    recipe: dict | None = None


@dataclass
class Scores:
    """Test-split results of the challenger and the models it is compared with."""

    scorer: SplitScorer
    model: object  # the challenger, loaded
    meta: dict  # its checkpoint meta
    checkpoint: Path  # its local copy
    proba: object  # its test probabilities
    metrics: dict  # its classification_metrics
    models: dict  # comparison row name -> metrics (baseline, frozen, fine-tuned)
    ablation: dict  # headline metrics with each inference-time component switched off


def run(args, ctx) -> dict:
    cfg: EvaluateConfig = args.config
    inputs = locate_inputs(args, ctx)
    out = ctx.output(args.out, "evaluate", _fingerprint(inputs, cfg))
    if (manifest := out.finished()) and not args.force:
        log.info("evaluation at %s is finished for these inputs; skipping (use --force to redo)", out.prefix)
        return skipped(manifest)

    from dermaops.dataset import Dataset

    dataset = Dataset.open(ctx.store, inputs.dataset_uri, ctx.scratch)
    local = ctx.scratch / "evaluate"
    scores = score_models(ctx, cfg, inputs, dataset, local)
    out.unpublish()
    confusion, gradcam = write_tables_and_plots(out, cfg, scores, local / "plots")
    feature_drift = None
    if inputs.registry_uri:  # before the gate: the champion the new data is compared with is the current one
        from dermaops.feature_drift import against_champion

        feature_drift = against_champion(ctx, inputs.registry_uri, dataset, cfg.batch_size, scores.scorer.device)
        log.info("feature-space drift against the champion's data: %s", feature_drift)
    promotion = promote(ctx, cfg, inputs, scores, dataset.version, local)
    summary = write_summary(out, cfg, inputs, scores, dataset.version, confusion, gradcam, promotion, feature_drift)
    return summary


def locate_inputs(args, ctx) -> Inputs:
    """The split, the trained models and the registry: manifests read, files located, or one-line errors."""
    split_uri, model_prefix = S3Uri.parse(args.split), S3Uri.parse(args.model)
    baseline_prefix = S3Uri.parse(args.baseline) if args.baseline else None
    run_id = args.run_id or run_id_from(S3Uri.parse(args.out))
    split_manifest = read_manifest(ctx.store, split_uri, "split")
    model_manifest = read_manifest(ctx.store, model_prefix, "train output")
    baseline_manifest = read_manifest(ctx.store, baseline_prefix, "baseline") if baseline_prefix else None
    dataset_uri = split_manifest.get("summary", {}).get("dataset_uri")
    if not dataset_uri:
        raise StageError(f"split manifest at {split_uri} has no summary.dataset_uri")
    return Inputs(
        run_id=run_id,
        split_uri=split_uri,
        split_manifest=split_manifest,
        dataset_uri=dataset_uri,
        model_prefix=model_prefix,
        model_manifest=model_manifest,
        cnn_uri=_model_file(model_manifest, model_prefix, "cnn.pt"),
        phase1_uri=_model_file(model_manifest, model_prefix, "cnn_phase1.pt", required=False),
        baseline_prefix=baseline_prefix,
        baseline_manifest=baseline_manifest,
        baseline_uri=(
            _model_file(baseline_manifest, baseline_prefix, "baseline.joblib") if baseline_manifest else None
        ),
        registry_uri=S3Uri.parse(args.registry) if args.registry else None,
        recipe=args.recipe,
    )


def _fingerprint(inputs: Inputs, cfg: EvaluateConfig) -> str:
    baseline = inputs.baseline_manifest
    return fingerprint(
        version=EVALUATION_VERSION,
        split=[str(inputs.split_uri), inputs.split_manifest["fingerprint"]],
        model=[str(inputs.model_prefix), inputs.model_manifest["fingerprint"]],
        baseline=[str(inputs.baseline_prefix), baseline["fingerprint"]] if baseline else None,
        registry=str(inputs.registry_uri) if inputs.registry_uri else None,
        run_id=inputs.run_id,
        **({"recipe": inputs.recipe} if inputs.recipe is not None else {}),
        **cfg.fingerprint_inputs(),
    )


def score_models(ctx, cfg: EvaluateConfig, inputs: Inputs, dataset, local: Path) -> Scores:
    """The challenger, its phase-1 model and the baseline, each scored on the test split."""
    from dermaops.metrics import headline
    from dermaops.models import pick_device
    from dermaops.report import BASELINE, FINE_TUNED, FROZEN
    from dermaops.split_files import read_split_csv

    device = pick_device(cfg.device)
    test = read_split_csv(ctx.store, inputs.split_uri, "test", inputs.split_manifest)
    scorer = SplitScorer(ctx, dataset, test, cfg.batch_size, device, cfg.tta)
    # Every file is checked against the manifest read in locate_inputs: never a model another run wrote since.
    checkpoint = download_verified(ctx.store, inputs.model_prefix, "cnn.pt", local / "cnn.pt", inputs.model_manifest)
    model, meta, proba = scorer.score_checkpoint(checkpoint, what=str(inputs.cnn_uri))
    models = {}
    if inputs.baseline_uri:
        baseline = download_verified(
            ctx.store, inputs.baseline_prefix, "baseline.joblib", local / "b.joblib", inputs.baseline_manifest
        )
        models[BASELINE] = scorer.score_baseline(baseline)
    if inputs.phase1_uri:
        phase1 = download_verified(
            ctx.store, inputs.model_prefix, "cnn_phase1.pt", local / "p1.pt", inputs.model_manifest
        )
        models[FROZEN] = scorer.metrics(scorer.score_checkpoint(phase1, str(inputs.phase1_uri))[2])
    metrics = models[FINE_TUNED] = scorer.metrics(proba)
    log.info("test: %s", ", ".join(f"{k} {v}" for k, v in headline(metrics).items()))
    return Scores(scorer, model, meta, checkpoint, proba, metrics, models, scorer.ablation(model, meta))


def write_tables_and_plots(out: Output, cfg: EvaluateConfig, scores: Scores, plots: Path):
    """Confusion matrices, the Grad-CAM grid and the CSV tables; returns (confusion counts, Grad-CAM facts)."""
    from dermaops.metrics import confusion_counts, row_normalised
    from dermaops.report import comparison_row, draw_confusion, per_class_rows, to_csv

    scorer = scores.scorer
    confusion = confusion_counts(scorer.labels, scores.proba.argmax(axis=1))
    plots.mkdir(parents=True, exist_ok=True)
    draw_confusion(plots / "cm.png", confusion, "Confusion matrix (counts)", normalised=False)
    draw_confusion(plots / "cmn.png", row_normalised(confusion), "Confusion matrix (row-normalised)", normalised=True)
    out.put_file("confusion_matrix.png", plots / "cm.png", content_type="image/png")
    out.put_file("confusion_matrix_normalized.png", plots / "cmn.png", content_type="image/png")
    gradcam = explain_melanomas(
        scorer, scores.model, scores.meta, scores.proba, cfg.gradcam_images, plots / "gradcam.png", scorer.device
    )
    if gradcam:
        out.put_file("gradcam_mel.png", plots / "gradcam.png", content_type="image/png")
    out.put_text("per_class.csv", to_csv(per_class_rows(scores.metrics)), "text/csv")
    rows = [comparison_row(name, m) for name, m in scores.models.items()]
    out.put_text("model_comparison.csv", to_csv(rows), "text/csv")
    return confusion, gradcam


def promote(ctx, cfg: EvaluateConfig, inputs: Inputs, scores: Scores, dataset_version: str, local: Path):
    """The champion/challenger gate (dermaops.promotion) when there is a registry; None otherwise."""
    if not inputs.registry_uri:
        return None
    from dermaops.promotion import Challenger, Floors, Registry, run_gate
    from dermaops.report import BASELINE

    challenger = Challenger(
        run_id=inputs.run_id,
        checkpoint=scores.checkpoint,
        source_uri=str(inputs.cnn_uri),
        metrics=scores.metrics,
        meta=scores.meta,
        dataset_version=dataset_version,
        split_uri=str(inputs.split_uri),
        recipe=inputs.recipe,
    )
    return run_gate(
        Registry(ctx.store, inputs.registry_uri),
        challenger,
        scores.scorer.score_champion,
        cfg.primary_metric,
        cfg.promotion_margin,
        Floors(cfg.mel_recall_floor, cfg.min_macro_f1, cfg.min_macro_auc, cfg.allow_subset_promotion),
        local,
        baseline=scores.models.get(BASELINE),
        subset=training_subset(inputs.model_manifest, inputs.split_manifest),
        allow_broken_champion=cfg.allow_broken_champion_override,
    )


def write_summary(
    out: Output, cfg, inputs: Inputs, scores: Scores, dataset_version, confusion, gradcam, promotion, feature_drift=None
):
    """metrics.json, report.md and the manifest; returns the stage summary."""
    from dermaops.metrics import headline, row_normalised
    from dermaops.report import render

    meta, metrics = scores.meta, scores.metrics
    report = render(
        run_id=inputs.run_id,
        dataset_version=dataset_version,
        split_uri=str(inputs.split_uri),
        split_strategy=inputs.split_manifest["summary"].get("strategy", "unknown"),
        model_uri=str(inputs.cnn_uri),
        model_meta=meta,
        models=scores.models,
        confusion=confusion,
        gradcam=gradcam,
        promotion=promotion,
    )
    out.put_json(
        "metrics.json",
        {
            "run_id": inputs.run_id,
            "dataset_version": dataset_version,
            "split_uri": str(inputs.split_uri),
            "model_uri": str(inputs.cnn_uri),
            "model_meta": {k: meta.get(k) for k in ("arch", "image_size", "stem", "phase", "epoch")},
            "classes": list(scores.scorer.classes),
            "test": metrics,
            "confusion_matrix": confusion.tolist(),
            "confusion_matrix_normalized": row_normalised(confusion).round(4).tolist(),
            "comparison": scores.models,
            "gradcam": gradcam,
            "promotion": promotion,
            "inference": {"tta": cfg.tta, "logit_adjustment": meta.get("logit_adjustment")},
            "ablation": scores.ablation,
            "feature_drift": feature_drift,
        },
    )
    report_uri = out.put_text("report.md", report, "text/markdown; charset=utf-8")
    summary = {
        **headline(metrics),
        "n_test": metrics["n"],
        "tta": cfg.tta,
        "ablation": scores.ablation,
        "run_id": inputs.run_id,
        "dataset_version": dataset_version,
        "promoted": bool(promotion and promotion["promoted"]),
        "decision": promotion["decision"] if promotion else "not_run",
        "promotion_reason": promotion["reason"] if promotion else "no --registry given",
        "champion_uri": promotion["champion_uri"] if promotion else None,
        "feature_drift": feature_drift,
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
        from dermaops.metrics import headline
        from dermaops.models import predict_proba

        images = self.images(meta["image_size"])
        variants = {"tta_on" if not self.tta else "tta_off": {"tta": not self.tta}}
        if meta.get("logit_bias") is not None:
            variants["logit_adjustment_off"] = {"tta": self.tta, "adjust": False}
        out = {}
        for name, kwargs in variants.items():
            m = self.metrics(predict_proba(model, images, meta, self.batch_size, self.device, **kwargs))
            out[name] = headline(m, ABLATION_KEYS)
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

        from dermaops.baseline import score_bundle

        bundle = joblib.load(path)
        size = bundle["meta"]["image_size"]
        log.info("scoring the baseline (random forest, %d px features) on %d test images", size, len(self.test))
        return self.metrics(score_bundle(bundle, self.images(size), self.classes))


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
