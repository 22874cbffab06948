"""Evaluate the trained CNN on the held-out test split, explain it, compare it, and run the
champion/challenger gate.

Reads the split (--split), the train stage's output (--model: cnn.pt = best fine-tuned checkpoint,
cnn_phase1.pt = best frozen-backbone checkpoint) and optionally the baseline (--baseline). Writes to
--out (s3://<bucket>/runs/<run_id>/evaluation):

    metrics.json                       every figure below, plus the promotion decision
    per_class.csv                      precision, recall, F1, one-vs-rest AUC, support per class
    confusion_matrix.png               counts (rows = true class)
    confusion_matrix_normalized.png    row-normalised (diagonal = per-class recall)
    reliability.png                    reliability diagram before / after the stored temperature
    gradcam_mel.png                    Grad-CAM grid of melanoma test images with their lesion-mask outlines
                                       (every class's energy ratio and pointing game: metrics.json)
    model_comparison.csv               baseline vs frozen (phase 1) vs fine-tuned
    report.md                          all of it, with the plots linked
    manifest.json                      written last

Cost. Each model is scored once: the softmax of every scored view is kept (dermaops.scoring.Scored), and the
variants (with or without test-time augmentation or the logit adjustment, before or after the
temperature) are derived from it. The optional passes are settings: --score-phase1 (skipped anyway
when cnn_phase1.pt holds cnn.pt's weights), --tta-ablation (8 views when --no-tta), --gradcam.

Uncertainty. The headline metrics, and the test sensitivity / specificity at the checkpoint's
melanoma threshold (`mel_threshold`, fitted on validation by train), get 95 % lesion-level bootstrap
intervals (dermaops.bootstrap). Calibration: test ECE (15 bins) without and with the checkpoint's
`temperature` (dermaops.calibration).

With --registry, the gate of dermaops.promotion decides whether this model replaces the champion
(re-scored on this same test split, compared by a paired bootstrap) and records the decision in the
registry's history. With --require-approval a challenger that passes is recorded as awaiting approval
(decision `awaiting_approval`, `pending_uri` in the summary) and the `promote` stage applies the
reviewer's answer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dermaops.config import EvaluateConfig, recipe_arg
from dermaops.errors import StageError
from dermaops.scoring import Scored, SplitScorer
from dermaops.stage import Context, Output, StageIO, download_verified, fingerprint, read_manifest, skipped
from dermaops.store import S3Uri

if TYPE_CHECKING:
    from dermaops.checkpoint import CheckpointMeta

HELP = "test-split metrics, confusion matrices, Grad-CAM, model comparison, champion/challenger promotion"
CONFIG = EvaluateConfig
# Bump when what evaluate computes changes: part of the fingerprint, so a re-run recomputes.
EVALUATION_VERSION = 4
LOCALIZATION_KEYS = ("mask_source", "layer", "pointing_tolerance_px", "per_class", "overall")
MODEL_META_KEYS = ("arch", "image_size", "geometry", "input_shape", "stem", "phase", "epoch")
SUBGROUP_PLOT, RISK_COVERAGE_PLOT = "subgroups_mel_sensitivity.png", "risk_coverage.png"
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
    scored: Scored  # the challenger's one scoring pass, kept: every derived figure comes from it
    checkpoint: Path  # its local copy
    proba: object  # its test probabilities as every consumer sees them (adjusted, tempered)
    metrics: dict  # its classification_metrics, with `<name>_ci`, `ece` and `mel_operating_point` added
    models: dict  # comparison row name -> metrics (baseline, frozen, fine-tuned)
    ablation: dict  # headline metrics with each inference-time component switched off
    intervals: dict  # metric -> {value, low, high}: lesion-level bootstrap
    calibration: dict  # test ECE before / after the stored temperature, reliability bins
    operating_point: dict | None  # the melanoma threshold's test sensitivity / specificity
    subgroups: dict  # per group of sex, age band, localization, dx_type: figures with intervals
    referral: dict  # the risk-coverage curve, AURC, and the stored referral threshold's test figures
    ood: dict | None  # the out-of-distribution detector's false-flag and detection rates (None: no detector)

    @property
    def model(self):
        return self.scored.model

    @property
    def meta(self) -> CheckpointMeta:
        return self.scored.meta


def run(stage_io: StageIO, cfg: EvaluateConfig, ctx: Context) -> dict:
    inputs = locate_inputs(stage_io, ctx)
    out = ctx.output(stage_io.out, "evaluate", _fingerprint(inputs, cfg))
    if (manifest := out.finished()) and not stage_io.force:
        log.info("evaluation at %s is finished for these inputs; skipping (use --force to redo)", out.prefix)
        return skipped(manifest)

    from dermaops.dataset import Dataset

    dataset = Dataset.open(ctx.store, inputs.dataset_uri, ctx.scratch)
    local = ctx.scratch / "evaluate"
    scores = score_models(ctx, cfg, inputs, dataset, local)
    out.unpublish()
    confusion, gradcam = write_tables_and_plots(out, cfg, scores, local / "plots")
    if gradcam:  # where the model looks, under the key the model card and the promotion record read
        scores.metrics["localization"] = {k: gradcam[k] for k in LOCALIZATION_KEYS}
    feature_drift = None
    if inputs.registry_uri:  # before the gate: the champion the new data is compared with is the current one
        from dermaops.feature_drift import against_champion

        feature_drift = against_champion(ctx, inputs.registry_uri, dataset, cfg.batch_size, scores.scorer.device)
        log.info("feature-space drift against the champion's data: %s", feature_drift)
    promotion = promote(ctx, cfg, inputs, scores, dataset.version, local)
    summary = write_summary(out, cfg, inputs, scores, dataset.version, confusion, gradcam, promotion, feature_drift)
    return summary


def locate_inputs(stage_io: StageIO, ctx) -> Inputs:
    where = stage_io.inputs
    """The split, the trained models and the registry: manifests read, files located, or one-line errors."""
    split_uri, model_prefix = S3Uri.parse(where["split"]), S3Uri.parse(where["model"])
    baseline_prefix = S3Uri.parse(where["baseline"]) if where["baseline"] else None
    run_id = where["run_id"] or run_id_from(S3Uri.parse(stage_io.out))
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
        registry_uri=S3Uri.parse(where["registry"]) if where["registry"] else None,
        recipe=where["recipe"],
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
    """The challenger, its phase-1 model and the baseline, each scored ONCE on the test split; the
    ablations, calibration figures, operating point and intervals are derived from those outputs."""
    from dermaops.metrics import headline
    from dermaops.models import pick_device
    from dermaops.report import BASELINE, FROZEN, evaluated_label
    from dermaops.split_files import read_split_csv

    device = pick_device(cfg.device)
    test = read_split_csv(ctx.store, inputs.split_uri, "test", inputs.split_manifest)
    scorer = SplitScorer(ctx, dataset, test, cfg.batch_size, device, cfg.tta, cfg.bootstrap_resamples)
    # Every file is checked against the manifest read in locate_inputs: never a model another run wrote since.
    checkpoint = download_verified(ctx.store, inputs.model_prefix, "cnn.pt", local / "cnn.pt", inputs.model_manifest)
    # With --no-tta and --tta-ablation the symmetry views are scored once; the headline uses the first.
    scored = scorer.score_checkpoint(checkpoint, what=str(inputs.cnn_uri), all_views=cfg.tta or cfg.tta_ablation)
    proba = scored.proba(scorer.tta)
    models = {}
    if inputs.baseline_uri:
        baseline = download_verified(
            ctx.store, inputs.baseline_prefix, "baseline.joblib", local / "b.joblib", inputs.baseline_manifest
        )
        models[BASELINE] = scorer.score_baseline(baseline)
    if inputs.phase1_uri and cfg.score_phase1:
        phase1 = download_verified(
            ctx.store, inputs.model_prefix, "cnn_phase1.pt", local / "p1.pt", inputs.model_manifest
        )
        if same_weights(phase1, scored.model):
            log.info("cnn_phase1.pt holds cnn.pt's weights (phase 2 did not improve on it): its scores are reused")
            models[FROZEN] = scorer.metrics(proba)
        else:
            phase1_scored = scorer.score_checkpoint(phase1, str(inputs.phase1_uri))
            models[FROZEN] = scorer.metrics(phase1_scored.proba(scorer.tta))
    metrics = models[evaluated_label(scored.meta)] = scorer.metrics(proba)
    log.info("test: %s", ", ".join(f"{k} {v}" for k, v in headline(metrics).items()))
    point = scorer.operating_point(scored, proba)
    intervals = scorer.intervals(proba, point["threshold"] if point else None)
    calibration = scorer.calibration(scored)
    add_uncertainty(metrics, intervals, calibration, point)
    # Beyond the headline: subgroups, referral and inputs unlike the training data, under the keys of the test
    # metrics the model card and the registry view read.
    metrics["subgroups"] = subgroups = scorer.subgroups(scored, proba)
    metrics["referral"] = referral = scorer.referral(proba, scored.meta)
    metrics["ood"] = ood = scorer.out_of_distribution(scored)
    return Scores(
        scorer=scorer,
        scored=scored,
        checkpoint=checkpoint,
        proba=proba,
        metrics=metrics,
        models=models,
        ablation=scorer.ablation(scored),
        intervals=intervals,
        calibration=calibration,
        operating_point=point,
        subgroups=subgroups,
        referral=referral,
        ood=ood,
    )


def same_weights(path: Path, model) -> bool:
    """Whether the checkpoint at `path` holds exactly `model`'s weights (the files differ in their meta)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True).get("model_state", {})
    own = model.state_dict()
    return state.keys() == own.keys() and all(torch.equal(state[k], own[k].cpu()) for k in own)


def add_uncertainty(metrics: dict, intervals: dict, calibration: dict, point: dict | None) -> None:
    """The intervals, the ECE and the operating point in the challenger's metrics, under the keys the model
    card and the promotion record read (`<name>_ci`, `ece`, `mel_operating_point`)."""
    for name, entry in intervals.items():
        if entry["low"] is None:
            continue
        if name == "mel_recall":
            metrics["per_class"]["mel"]["recall_ci"] = [entry["low"], entry["high"]]
        elif name in metrics:
            metrics[f"{name}_ci"] = [entry["low"], entry["high"]]
    metrics["ece"] = calibration["ece_after"] if calibration["ece_after"] is not None else calibration["ece_before"]
    metrics["mel_operating_point"] = point


def write_tables_and_plots(out: Output, cfg: EvaluateConfig, scores: Scores, plots: Path):
    """Confusion matrices, the reliability diagram, the Grad-CAM grid and the CSV tables; returns
    (confusion counts, Grad-CAM facts or None)."""
    from dermaops.calibration import draw_reliability
    from dermaops.metrics import confusion_counts, row_normalised
    from dermaops.report import comparison_row, draw_confusion, per_class_rows, to_csv

    scorer = scores.scorer
    confusion = confusion_counts(scorer.labels, scores.proba.argmax(axis=1))
    plots.mkdir(parents=True, exist_ok=True)
    draw_confusion(plots / "cm.png", confusion, "Confusion matrix (counts)", normalised=False)
    draw_confusion(plots / "cmn.png", row_normalised(confusion), "Confusion matrix (row-normalised)", normalised=True)
    out.put_file("confusion_matrix.png", plots / "cm.png", content_type="image/png")
    out.put_file("confusion_matrix_normalized.png", plots / "cmn.png", content_type="image/png")
    cal = scores.calibration
    draw_reliability(
        plots / "reliability.png",
        cal["reliability_before"],
        cal["reliability_after"],
        f"Reliability on the test split ({len(scorer.labels)} images)",
    )
    out.put_file("reliability.png", plots / "reliability.png", content_type="image/png")
    from dermaops import selective, subgroups

    subgroups.draw_forest(
        plots / "forest.png",
        scores.subgroups,
        scores.operating_point and {"value": scores.operating_point["sensitivity"]},
        f"Melanoma sensitivity by subgroup, test split ({len(scorer.labels)} images)",
    )
    out.put_file(SUBGROUP_PLOT, plots / "forest.png", content_type="image/png")
    out.put_text("subgroups.csv", to_csv(subgroups.table_rows(scores.subgroups)), "text/csv")
    selective.draw(
        plots / "risk_coverage.png",
        scorer.risk_coverage(scores.proba),
        f"Risk-coverage on the test split ({len(scorer.labels)} images)",
        scores.referral.get("test"),
        scores.referral.get("target_accuracy"),
    )
    out.put_file(RISK_COVERAGE_PLOT, plots / "risk_coverage.png", content_type="image/png")
    gradcam = None
    if cfg.gradcam:
        gradcam = explain(scorer, scores, cfg.gradcam_images, plots / "gradcam.png")
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
    from dermaops.promotion import Challenger, GatePolicy, Registry, run_gate
    from dermaops.report import BASELINE

    challenger = Challenger(
        run_id=inputs.run_id,
        checkpoint=scores.checkpoint,
        source_uri=str(inputs.cnn_uri),
        metrics=scores.metrics,
        meta=scores.meta,
        dataset_version=dataset_version,
        split_uri=str(inputs.split_uri),
        proba=scores.proba,
        recipe=inputs.recipe,
    )
    return run_gate(
        Registry(ctx.store, inputs.registry_uri),
        challenger,
        scores.scorer.score_champion,
        GatePolicy.from_config(cfg),
        local,
        baseline=scores.models.get(BASELINE),
        subset=training_subset(inputs.model_manifest, inputs.split_manifest),
        compare=scores.scorer.compare,
        subgroup_check=scores.scorer.subgroup_check(cfg.subgroup_min_melanomas) if cfg.subgroup_gate else None,
    )


def _rounded(value, digits: int = 4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


def write_summary(
    out: Output, cfg, inputs: Inputs, scores: Scores, dataset_version, confusion, gradcam, promotion, feature_drift=None
):
    """metrics.json, report.md and the manifest; returns the stage summary."""
    from dermaops.metrics import headline, row_normalised
    from dermaops.report import render

    meta, metrics = scores.meta, scores.metrics
    stored = meta.record()
    calibration = {k: v for k, v in scores.calibration.items() if not k.startswith("reliability")}
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
        intervals=scores.intervals,
        n_resamples=scores.scorer.resamples.n,
        calibration=calibration,
        operating_point=scores.operating_point,
        subgroups=scores.subgroups,
        referral=scores.referral,
        ood=scores.ood,
        train_config=inputs.model_manifest.get("config"),
    )
    out.put_json(
        "metrics.json",
        {
            "run_id": inputs.run_id,
            "dataset_version": dataset_version,
            "split_uri": str(inputs.split_uri),
            "model_uri": str(inputs.cnn_uri),
            "model_meta": {k: stored[k] for k in MODEL_META_KEYS},
            "classes": list(scores.scorer.classes),
            "test": metrics,
            "intervals": {
                "method": "percentile, lesion-level bootstrap",
                "level": 0.95,
                "resamples": scores.scorer.resamples.n,
                "lesions": scores.scorer.resamples.n_groups,
                "metrics": scores.intervals,
            },
            "calibration": {**calibration, "reliability_before": scores.calibration["reliability_before"],
                            "reliability_after": scores.calibration["reliability_after"]},
            "mel_operating_point": scores.operating_point,
            "confusion_matrix": confusion.tolist(),
            "confusion_matrix_normalized": row_normalised(confusion).round(4).tolist(),
            "comparison": scores.models,
            "gradcam": gradcam,
            "promotion": promotion,
            "inference": {
                "tta": cfg.tta,
                "logit_adjustment": meta.logit_adjustment,
                "temperature": scores.calibration["temperature"],
            },
            "ablation": scores.ablation,
            "feature_drift": feature_drift,
        },
    )  # fmt: skip
    report_uri = out.put_text("report.md", report, "text/markdown; charset=utf-8")
    summary = {
        **headline(metrics),
        "intervals": {k: _rounded([v["low"], v["high"]]) for k, v in scores.intervals.items() if v["low"] is not None},
        "ece": _rounded(calibration["ece_before"]),
        "ece_calibrated": _rounded(calibration["ece_after"]),
        "temperature": _rounded(calibration["temperature"]),
        "mel_operating_point": _rounded(scores.operating_point),
        "aurc": _rounded(scores.referral["aurc"]),
        "referral": _rounded(scores.referral.get("test")),
        "ood": _rounded({k: v for k, v in scores.ood.items() if k in ("false_flag_rate", "detection")})
        if scores.ood
        else None,
        "gradcam_localization": gradcam["localization_ratio"] if gradcam else None,
        "n_test": metrics["n"],
        "tta": cfg.tta,
        "ablation": scores.ablation,
        "run_id": inputs.run_id,
        "dataset_version": dataset_version,
        "promoted": bool(promotion and promotion["promoted"]),
        "decision": promotion["decision"] if promotion else "not_run",
        "promotion_reason": promotion["reason"] if promotion else "no --registry given",
        "champion_uri": promotion["champion_uri"] if promotion else None,
        # Set when the challenger awaits a reviewer (--require-approval): the DAG's approve task then asks.
        "pending_uri": promotion.get("pending_uri") if promotion else None,
        "feature_drift": feature_drift,
        "metrics_uri": str(out.uri("metrics.json")),
        "report_uri": str(report_uri),
    }
    out.publish(summary)
    return summary


def explain(scorer: SplitScorer, scores: Scores, count: int, path: Path) -> dict | None:
    """Grad-CAM of each test image's TRUE class, judged against its lesion mask: per class the energy ratio
    and the pointing-game hit rate (dermaops.gradcam.Localization); the grid shows `count` melanomas spread
    over p(mel), with the mask outlines. None if the test split has no melanoma (no grid to draw)."""
    import numpy as np

    from dermaops.gradcam import (
        POINTING_TOLERANCE,
        Localization,
        draw_grid,
        gradcam,
        otsu_masks,
        pick_spread,
        pick_target_layer,
    )
    from dermaops.imagecache import load_masks

    model, meta, proba, mel = scores.model, scores.meta, scores.proba, scorer.mel
    melanomas = np.flatnonzero(scorer.labels == mel)
    if len(melanomas) == 0:
        log.warning("no melanoma image in the test split: no Grad-CAM")
        return None
    started = time.monotonic()
    frame = meta.frame
    images = scorer.images(frame)
    masks = load_masks(scorer.dataset, scorer.image_ids, frame)
    mask_source = "lesion segmentations" if masks is not None else "Otsu threshold (the dataset has no masks)"
    if masks is None:
        masks = otsu_masks(images)
    layer, layer_name, map_size = pick_target_layer(model, meta)
    mass = np.zeros(images.shape[:3], dtype=np.float32)
    heatmaps, evidence = np.zeros_like(mass), np.zeros(len(images), dtype=np.float32)
    for label in np.unique(scorer.labels):
        rows = np.flatnonzero(scorer.labels == label)
        cam = gradcam(model, layer, images[rows], meta, int(label), scorer.device, batch_size=scorer.batch_size)
        mass[rows], heatmaps[rows], evidence[rows] = cam.mass, cam.heatmaps, cam.raw.max(axis=(1, 2))
    found = Localization.of(mass, masks)
    per_class = {scorer.classes[c]: found.summary(np.flatnonzero(scorer.labels == c)) for c in np.unique(scorer.labels)}
    shown = melanomas[pick_spread(proba[melanomas, mel], count)]
    ids = [scorer.image_ids[i] for i in shown]
    predicted = [scorer.classes[i] for i in proba[shown].argmax(axis=1)]
    p_mel = proba[shown, mel]
    titles = [
        f"{image_id}\npred {pred}, p(mel) {p:.2f}, energy {ratio:.2f}, {'hit' if hit else 'miss'}"
        + ("" if ev > 0 else "\nno mel evidence")
        for image_id, pred, p, ratio, hit, ev in zip(
            ids, predicted, p_mel, found.energy[shown], found.hits[shown], evidence[shown], strict=True
        )
    ]
    draw_grid(path, images[shown], heatmaps[shown], titles, masks=masks[shown])
    mel_figures = per_class[scorer.classes[mel]]
    log.info("Grad-CAM over %s (%dx%d) on %d test images in %.1f s against %s: melanoma energy ratio %s, "
             "pointing-game hit rate %s", layer_name, *map_size, len(images), time.monotonic() - started,
             mask_source, mel_figures["energy_ratio"], mel_figures["pointing_hit_rate"])  # fmt: skip
    return {
        "image_ids": ids,
        "predicted": predicted,
        "p_mel": [round(float(q), 4) for q in p_mel],
        "layer": layer_name,
        "map_size": list(map_size),
        "mask_source": mask_source,
        "target": "each image's true class",
        "pointing_tolerance_px": round(POINTING_TOLERANCE * frame.shape[1]),
        # The melanoma figures under the keys the report, model card and registry read.
        "localization_ratio": mel_figures["energy_ratio"],
        "localization_ratio_median": mel_figures["energy_ratio_median"],
        "localization_images": mel_figures["energy_images"],
        "pointing_hit_rate": mel_figures["pointing_hit_rate"],
        "per_class": per_class,
        "overall": found.summary(),
        "energy_ratios_shown": [round(float(r), 4) for r in found.energy[shown]],
        "pointing_hits_shown": [bool(h) for h in found.hits[shown]],
    }
