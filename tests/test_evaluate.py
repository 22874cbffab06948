"""The evaluate stage on real 28 px images: consistent metrics, plots, report, Grad-CAM, first promotion,
idempotency and one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from dermaops.checkpoint import load_checkpoint
from dermaops.dataset import CLASSES, Dataset
from dermaops.gradcam import gradcam
from dermaops.imagecache import load_images
from dermaops.stage import Context
from dermaops.store import S3Uri, sha256_bytes

PNG = b"\x89PNG\r\n\x1a\n"
FILES = {
    "metrics.json",
    "per_class.csv",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "gradcam_mel.png",
    "reliability.png",
    "model_comparison.csv",
    "report.md",
}


def _csv(store, uri: S3Uri) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(uri)))


def test_evaluate_writes_consistent_metrics_report_and_promotes_a_first_model(
    small_split, small_models, run_stage, bucket, store
):
    root = f"s3://{bucket.bucket}"
    split = S3Uri.parse(small_split["split_uri"])
    run_stage(
        # A forest of stumps: the floor a first champion has to beat (the fitted model, a linear head on a
        # random backbone, is weak on purpose and would not beat a full forest).
        "train_baseline", "--split", str(split), "--out", f"{root}/runs/r1/models/baseline",
        "--n-estimators", "10", "--max-depth", "1",
    )  # fmt: skip
    argv = [
        "evaluate",
        "--split",
        str(split),
        "--model",
        small_models["fitted"],
        "--baseline",
        f"{root}/runs/r1/models/baseline",
        "--out",
        f"{root}/runs/r1/evaluation",
        "--registry",
        f"{root}/registry/ham10000",
        "--mel-recall-floor",
        "0.2",
        # The fitted model is weak on purpose (a linear head on a random backbone): the absolute floors are
        # off, so this first promotion rests on the melanoma floor and on beating this run's Random Forest.
        "--min-macro-f1",
        "0",
        "--min-macro-auc",
        "0",
    ]
    summary = run_stage(*argv).summary
    assert summary["status"] == "done" and summary["run_id"] == "r1"

    out = S3Uri.parse(f"{root}/runs/r1/evaluation")
    manifest = store.get_json(out.join("manifest.json"))
    assert FILES <= set(manifest["files"])
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "gradcam_mel.png"):
        assert store.get_bytes(out.join(name)).startswith(PNG)

    # The figures agree with each other and with the test split.
    test = _csv(store, split.join("test.csv"))
    metrics = store.get_json(out.join("metrics.json"))
    m = metrics["test"]
    confusion = np.array(metrics["confusion_matrix"])
    assert m["n"] == len(test) == confusion.sum() == summary["n_test"]
    supports = [m["per_class"][c]["support"] for c in CLASSES]
    assert sum(supports) == len(test)
    assert confusion.sum(axis=1).tolist() == supports == np.bincount(test["label"], minlength=7).tolist()
    assert np.isclose(m["accuracy"], np.trace(confusion) / confusion.sum())
    recalls = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    assert np.allclose(recalls, [m["per_class"][c]["recall"] for c in CLASSES])
    assert np.isclose(m["balanced_accuracy"], recalls[confusion.sum(axis=1) > 0].mean())
    assert np.allclose(np.array(metrics["confusion_matrix_normalized"]).sum(axis=1), 1, atol=1e-3)
    assert 0.0 <= m["macro_auc"] <= 1.0 and summary["macro_auc"] == round(m["macro_auc"], 4)
    assert summary["mel_recall"] == round(m["per_class"]["mel"]["recall"], 4)
    # Scored with test-time augmentation (the default); the ablation re-scores the same model without it.
    assert summary["tta"] is True
    assert metrics["inference"] == {"tta": True, "logit_adjustment": None, "temperature": None}
    assert set(summary["ablation"]) == {"tta_off"} and summary["ablation"] == metrics["ablation"]
    per_class = _csv(store, out.join("per_class.csv"))
    assert per_class["class"].tolist() == list(CLASSES) and per_class["support"].tolist() == supports

    comparison = _csv(store, out.join("model_comparison.csv"))
    # The evaluated checkpoint is named as it is (phase and epoch), not "fine-tuned" whatever its phase.
    meta = metrics["model_meta"]
    label = f"best on validation (phase {meta['phase']}, epoch {meta['epoch']})"
    assert comparison["model"].tolist() == ["baseline (random forest)", "frozen (phase 1)", label]
    assert np.isclose(comparison["macro_f1"].iloc[-1], m["macro_f1"], atol=1e-4)

    # Grad-CAM images are melanoma test images.
    mel_ids = set(test.loc[test["dx"] == "mel", "image_id"])
    assert len(metrics["gradcam"]["image_ids"]) == min(8, len(mel_ids))
    assert set(metrics["gradcam"]["image_ids"]) <= mel_ids

    report = store.get_bytes(out.join("report.md")).decode()
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "gradcam_mel.png"):
        assert f"]({name})" in report  # relative links to files published next to the report
    assert "| mel |" in report and "change vs baseline" in report and "promoted" in report
    assert (
        f"- evaluated model, {label}: " in report and "chosen because it has the highest validation macro F1" in report
    )

    # A first model that clears the floor becomes champion; the registry holds its own copy.
    assert summary["promoted"] is True and summary["decision"] == "promoted"
    assert "no champion yet" in summary["promotion_reason"]
    assert "beats this run's Random Forest baseline" in summary["promotion_reason"]
    champion = store.get_json(f"{root}/registry/ham10000/champion.json")
    assert champion["model_uri"] == summary["champion_uri"]
    assert champion["model_uri"].startswith(f"{root}/registry/ham10000/models/r1-")
    source = store.get_bytes(S3Uri.parse(small_models["fitted"]).join("cnn.pt"))
    assert sha256_bytes(store.get_bytes(champion["model_uri"])) == champion["model_sha256"] == sha256_bytes(source)
    assert champion["run_id"] == "r1" and champion["dataset_version"] == summary["dataset_version"]
    history = list(store.list(f"{root}/registry/ham10000/history"))
    assert len(history) == 1

    # Same inputs: skipped, no new decision.
    again = run_stage(*argv).summary
    assert again["status"] == "skipped" and again["promoted"] is True
    assert len(list(store.list(f"{root}/registry/ham10000/history"))) == 1

    # Forced: re-evaluated; the checkpoint is already the champion, recorded as such, champion unchanged.
    forced = run_stage(*argv, "--force").summary
    assert forced["status"] == "done" and forced["decision"] == "already_champion" and forced["promoted"] is True
    assert len(list(store.list(f"{root}/registry/ham10000/history"))) == 2
    assert store.get_json(f"{root}/registry/ham10000/champion.json") == champion

    # A bad flag on a re-run fails in one line and leaves the finished evaluation published.
    published = store.get_json(out.join("manifest.json"))
    bad = run_stage(*argv, "--force", "--promotion-margin", "-1", check=False)
    assert bad.returncode == 2 and "--promotion-margin" in bad.error_line
    assert store.get_json(out.join("manifest.json")) == published


def test_evaluate_reports_calibration_operating_point_intervals_and_localization(
    small_split, small_models, run_stage, bucket, store, tmp_path
):
    """The `calibrated` model (temperature and mel_threshold fitted on validation, as train does): every
    derived figure is checked against a recomputation from the checkpoint and the test split."""
    from dermaops.calibration import reliability
    from dermaops.models import predict_proba
    from dermaops.predictor import apply_temperature

    split = S3Uri.parse(small_split["split_uri"])
    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/cal/evaluation")
    argv = ["evaluate", "--split", str(split), "--model", small_models["calibrated"], "--out", str(out)]
    summary = run_stage(*argv, "--no-score-phase1", "--bootstrap-resamples", "500").summary
    metrics = store.get_json(out.join("metrics.json"))

    test = _csv(store, split.join("test.csv"))
    dataset = Dataset.open(store, small_split["dataset_uri"], tmp_path)
    images = load_images(Context(store, tmp_path), dataset, 28).rows(test["image_id"].tolist())
    checkpoint = store.download(S3Uri.parse(small_models["calibrated"]).join("cnn.pt"), tmp_path / "cnn.pt")
    model, meta = load_checkpoint(checkpoint)
    raw = predict_proba(model, images, meta, tta=True)
    calibrated = apply_temperature(raw, meta.temperature)
    labels = test["label"].to_numpy()
    mel = CLASSES.index("mel")

    # Scored once, with TTA; the single-view ablation is derived from the stored views and equals a real
    # single-view scoring.
    assert np.isclose(metrics["test"]["macro_f1"], summary["macro_f1"], atol=1e-4)
    single = predict_proba(model, images, meta, tta=False).argmax(1)
    assert summary["ablation"]["tta_off"]["accuracy"] == round(float((single == labels).mean()), 4)
    # Calibration: the stored temperature, ECE before and after recomputed.
    cal = metrics["calibration"]
    assert cal["temperature"] == meta.temperature and cal["fitted"]["fitted_on"] == "val"
    assert np.isclose(cal["ece_before"], reliability(raw, labels)["ece"], atol=1e-5)
    assert np.isclose(cal["ece_after"], reliability(calibrated, labels)["ece"], atol=1e-5)
    assert summary["ece_calibrated"] == round(cal["ece_after"], 4) and metrics["test"]["ece"] == cal["ece_after"]
    # The operating point: the checkpoint's threshold, its test sensitivity and specificity, intervals.
    point = metrics["mel_operating_point"]
    flagged = calibrated[:, mel] >= meta.mel_threshold
    assert point["threshold"] == meta.mel_threshold and point["target_sensitivity"] == 0.85
    assert np.isclose(point["sensitivity"], flagged[labels == mel].mean(), atol=1e-6)
    assert np.isclose(point["specificity"], (~flagged[labels != mel]).mean(), atol=1e-6)
    for name in ("sensitivity", "specificity"):
        low, high = point[f"{name}_ci"]
        assert low <= point[name] <= high and low < high
    assert summary["mel_operating_point"]["threshold"] == round(meta.mel_threshold, 4)
    # Every headline metric has a lesion-bootstrap interval around its value.
    intervals = metrics["intervals"]
    assert intervals["resamples"] == 500 and intervals["lesions"] == test["lesion_id"].nunique()
    for name, entry in intervals["metrics"].items():
        value = metrics["test"]["per_class"]["mel"]["recall"] if name == "mel_recall" else metrics["test"][name]
        assert entry["low"] <= value <= entry["high"] and np.isclose(entry["value"], value), name
        assert summary["intervals"][name] == [round(entry["low"], 4), round(entry["high"], 4)]
    # Grad-CAM on the deepest layer with a map >= 6x6 (layer3, 7x7 at 28 px), of each test image's true class;
    # the 28 px pack has no lesion masks, so the Otsu masks stand in, and the report says so.
    gradcam = metrics["gradcam"]
    assert gradcam["layer"] == "layer3" and gradcam["map_size"] == [7, 7] and gradcam["mask_source"].startswith("Otsu")
    assert gradcam["localization_images"] <= int((labels == mel).sum()) and gradcam["localization_ratio"] > 0
    assert gradcam["localization_ratio"] == gradcam["per_class"]["mel"]["energy_ratio"]
    assert 0 <= gradcam["pointing_hit_rate"] <= 1 and gradcam["overall"]["n"] == len(labels)
    assert {c: row["n"] for c, row in gradcam["per_class"].items()} == dict(test["dx"].value_counts())
    assert summary["gradcam_localization"] == gradcam["localization_ratio"]
    assert metrics["test"]["localization"]["per_class"] == gradcam["per_class"]  # what the model card reads
    # --no-score-phase1: no frozen row.
    assert [name.split(" (")[0] for name in metrics["comparison"]] == ["best on validation"]

    assert store.get_bytes(out.join("reliability.png")).startswith(PNG)
    report = store.get_bytes(out.join("report.md")).decode()
    assert "## Calibration" in report and "](reliability.png)" in report and "## Melanoma operating point" in report
    assert f"[{intervals['metrics']['macro_f1']['low']:.4f}, {intervals['metrics']['macro_f1']['high']:.4f}]" in report
    mel_row = gradcam["per_class"]["mel"]
    assert f"| mel | {mel_row['n']} | {mel_row['energy_ratio']:.4f} |" in report and "Otsu threshold" in report


def test_gradcam_uses_real_gradients_and_maps_differ_inside_the_image(small_split, small_models, store, tmp_path):
    test = _csv(store, S3Uri.parse(small_split["split_uri"]).join("test.csv"))
    mel = test.loc[test["dx"] == "mel", "image_id"].tolist()
    dataset = Dataset.open(store, small_split["dataset_uri"], tmp_path)
    images = load_images(Context(store, tmp_path), dataset, 28).rows(mel)
    checkpoint = store.download(S3Uri.parse(small_models["fitted"]).join("cnn.pt"), tmp_path / "cnn.pt")
    model, meta = load_checkpoint(checkpoint)
    target = CLASSES.index("mel")

    cam = gradcam(model, model.layer4, images, meta, target)

    assert cam.heatmaps.shape == (len(mel), 28, 28)
    assert cam.heatmaps.min() >= 0 and cam.heatmaps.max() <= 1
    # ResNet ends in global average pooling + a linear layer, so d score / d activation is exactly
    # fc.weight[target] / (h*w) at every position: the hooked gradient must equal it.
    h, w = cam.raw.shape[1:]
    expected = float(model.fc.weight[target].detach().norm()) / np.sqrt(h * w)
    assert h * w > 1 and np.allclose(cam.gradient_norms, expected, rtol=1e-4) and expected > 0
    with_evidence = [hm for hm, raw in zip(cam.heatmaps, cam.raw, strict=True) if raw.max() > 0]
    assert len(with_evidence) >= 2
    for heatmap in with_evidence:
        hot = heatmap > 0.5
        assert heatmap.std() > 0 and 0 < hot.mean() < 1  # a localised highlight, not a flat map
        y, x = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert 0 <= y < 28 and 0 <= x < 28
    assert not np.allclose(with_evidence[0], with_evidence[1], atol=1e-3)
    assert len({round(float(hm.mean()), 4) for hm in with_evidence}) > 1


def test_bad_flags_fail_in_one_line_and_write_nothing(small_split, small_models, run_stage, bucket, store):
    out = f"s3://{bucket.bucket}/runs/r2/evaluation"
    common = ["--model", small_models["fitted"], "--out", out]
    missing = run_stage("evaluate", "--split", f"s3://{bucket.bucket}/runs/none/split", *common, check=False)
    assert missing.returncode == 2
    assert "no finished split" in missing.error_line and "runs/none/split" in missing.error_line
    assert len([line for line in missing.stderr.splitlines() if line.strip()]) == 1

    metric = run_stage("evaluate", "--split", small_split["split_uri"], *common, "--primary-metric", "f2", check=False)
    assert metric.returncode == 2 and "invalid choice: 'f2'" in metric.error_line

    floor = run_stage(
        "evaluate", "--split", small_split["split_uri"], *common, "--mel-recall-floor", "1.5", check=False
    )
    assert floor.returncode == 2 and "--mel-recall-floor" in floor.error_line

    no_run = run_stage(
        "evaluate", "--split", small_split["split_uri"], *common[:2], "--out", f"s3://{bucket.bucket}/x", check=False
    )
    assert no_run.returncode == 2 and "--run-id" in no_run.error_line
    assert list(store.list(f"s3://{bucket.bucket}/")) == []


def test_the_report_says_which_checkpoint_was_evaluated_and_why():
    """quick-cpu's one fine-tuning epoch can lose on validation: cnn.pt is then phase 1's best checkpoint,
    the same model as the frozen row, and the report says so instead of calling it fine-tuned."""
    from dermaops.checkpoint import CheckpointMeta
    from dermaops.report import evaluated_label, why_chosen

    model = CheckpointMeta.for_model("resnet18", list("abcdefg"), 48, "imagenet", "none")
    phase1 = model.replace(phase=1, epoch=6, val={"macro_f1": 0.4312})
    assert evaluated_label(phase1) == "best on validation (phase 1, epoch 6)"
    assert why_chosen(phase1, {"finetune_epochs": 1}) == (
        "the highest validation macro F1 (0.4312) of every epoch trained; phase 2's 1 fine-tuning epoch did not "
        "improve on it, so it is the frozen (phase 1) model"
    )
    assert why_chosen(phase1, {"finetune_epochs": 0}).endswith("(phase 1 only: no fine-tuning epochs)")
    phase2 = model.replace(phase=2, epoch=7, val={"macro_f1": 0.45})
    assert (
        why_chosen(phase2, {"finetune_epochs": 1}) == "the highest validation macro F1 (0.4500) of every epoch trained"
    )
