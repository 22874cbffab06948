"""Beyond the headline: subgroups, referral (selective prediction), inputs unlike the training data and
prediction monitoring. The math by hand first, then the real stages: evaluate on the `guarded` model (the
guards fitted by dermaops.guards.fit_checkpoint, as train fits them) with every figure recomputed, and predict
on real dermatoscopy, scikit-image's photographs and corrupted dermatoscopy, its monitoring alert posted to the
Slack stand-in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dermaops import monitoring, ood, selective, subgroups
from dermaops.dataset import CLASSES, Dataset
from dermaops.stage import Context
from dermaops.store import S3Uri

from tests.support.ood_images import PHOTOGRAPHS, corrupted_jpegs, photograph_jpegs
from tests.support.registry import read_csv, sample_jpegs
from tests.support.slack_api import CHANNEL, block_text

PNG = b"\x89PNG\r\n\x1a\n"


# -- by hand ----------------------------------------------------------------------------------------------
def test_risk_coverage_aurc_and_the_referral_threshold_by_hand():
    # Confidences 0.9, 0.8, 0.8, 0.6, 0.4: right, right, wrong, right, wrong. The tied 0.8s go together.
    conf = np.array([0.4, 0.8, 0.9, 0.6, 0.8])
    correct = np.array([False, True, True, True, False])
    curve = selective.risk_coverage(conf, correct)
    assert curve.threshold.tolist() == [0.9, 0.8, 0.6, 0.4]
    assert curve.coverage.tolist() == [0.2, 0.6, 0.8, 1.0]
    assert np.allclose(curve.risk, [0, 1 / 3, 1 / 4, 2 / 5])
    assert np.isclose(curve.aurc, 0.2 * 0 + 0.4 * (1 / 3) + 0.2 * (1 / 4) + 0.2 * (2 / 5))
    # 75 % accuracy is reached down to 0.6 (3 of 4 right): the largest coverage that keeps it.
    fitted = selective.threshold_for_accuracy(conf, correct, 0.75)
    assert fitted["threshold"] == 0.6 and fitted["coverage"] == 0.8 and fitted["accuracy"] == 0.75
    assert selective.decisions(np.array([[0.7, 0.3], [0.55, 0.45]]), 0.6).tolist() == ["decided", "refer"]
    # Not even the most confident image reaches 100 %: everything referred, and the fit says so.
    never = selective.threshold_for_accuracy(conf, ~correct, 1.0)
    assert not never["reachable"] and never["threshold"] > 0.9 and never["coverage"] == 0.0
    # A confidence that ranks every error last gives a lower AURC than one that ranks them first.
    good = selective.risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, True, False, False])).aurc
    bad = selective.risk_coverage(np.array([0.6, 0.7, 0.8, 0.9]), np.array([True, True, False, False])).aurc
    assert good < bad
    # The lesion bootstrap of both figures: unit weights give the point values.
    cov, acc = selective.weighted_at_threshold(np.ones((1, 5), dtype=np.float32), conf, correct, 0.6)
    assert np.isclose(cov[0], 0.8) and np.isclose(acc[0], 0.75)


def test_mahalanobis_detector_with_a_shrunk_covariance_flags_what_lies_far_from_every_class():
    rng = np.random.default_rng(0)
    # 64 features, 60 images per class: the plain covariance of 180 images would be near singular.
    means = rng.normal(scale=4, size=(3, 64))
    labels = np.repeat(np.arange(3), 60)
    train = means[labels] + rng.normal(size=(180, 64))
    detector = ood.fit(train, labels)
    assert np.allclose(detector.means, means, atol=0.5) and np.isfinite(detector.precision).all()
    val = means[labels] + rng.normal(size=(180, 64))
    threshold = ood.threshold_for_tpr(detector.scores(val), 0.95)
    assert threshold in detector.scores(val) and np.mean(detector.scores(val) <= threshold) >= 0.95
    found = ood.Detector(detector.means, detector.precision, threshold)
    assert found.flags(val).mean() <= 0.06
    assert found.flags(rng.normal(scale=4, size=(50, 64))).mean() == 1.0  # far from every class
    # The score is the squared distance to the NEAREST class mean: an image at a class mean scores about 0.
    assert found.scores(means).max() < found.scores(val).min() + 1e-9


def test_subgroups_by_hand_and_the_paired_gate_names_the_group():
    assert [subgroups.age_band(a) for a in (5, 29.9, 30, 49, 50, 69, 70, 85, None, float("nan"))] == [
        "< 30", "< 30", "30-49", "30-49", "50-69", "50-69", ">= 70", ">= 70", "unknown", "unknown",
    ]  # fmt: skip
    meta = pd.DataFrame({"localization": ["back"] * 5 + ["face"] * 3 + ["ear"] * 1 + [None] * 2})
    assert subgroups.largest_localizations(meta, 2) == ["back", "face"]
    mel = CLASSES.index("mel")
    # 40 lesions of 2 images each: male melanomas (16 images, 8 lesions), female others but for one melanoma
    # image in each of two lesions.
    n = 80
    labels = np.full(n, CLASSES.index("nv"))
    labels[:16] = mel
    labels[[40, 42]] = mel
    test = pd.DataFrame(
        {
            "sex": ["male"] * 40 + ["female"] * 40,
            "age": [25] * 20 + [None] * 20 + [75] * 40,
            "localization": ["back"] * 60 + ["ear"] * 20,
            "dx_type": "histo",
        }
    )
    lesions = np.repeat(np.arange(40), 2)
    from dermaops.bootstrap import Resamples

    table = subgroups.Subgroups(
        labels, lesions, subgroups.group_labels(test, ["back"]), ["back"], Resamples.of(lesions, 500).weights,
        mel, len(CLASSES),
    )  # fmt: skip
    proba = np.full((n, len(CLASSES)), 0.01)
    proba[np.arange(n), labels] = 0.9  # every image right
    flagged = labels == mel
    figures = table.figures(proba, flagged, "argmax == mel")
    rows = {(g["attribute"], g["group"]): g for g in figures["groups"]}
    assert [k for k in rows if k[0] == "age_band"] == [("age_band", "< 30"), ("age_band", ">= 70"),
                                                       ("age_band", "unknown")]  # fmt: skip
    assert rows[("localization", "other")]["n"] == 20  # ear is not among the largest: other
    male = rows[("sex", "male")]
    assert (male["n"], male["lesions"], male["n_mel"], male["small"]) == (40, 20, 16, True)
    assert male["accuracy"]["value"] == 1.0 and male["mel_sensitivity"]["value"] == 1.0
    assert male["macro_f1"]["value"] is None  # two classes present of seven: not reported
    assert rows[("sex", "female")]["mel_specificity"]["value"] == 1.0

    # A challenger that misses every male melanoma and one female one; judged where >= 2 melanomas.
    worse = flagged.copy()
    worse[:16] = False
    worse[40] = False
    compared = table.compare(worse, flagged, min_melanomas=2)
    by_group = {(c["attribute"], c["group"]): c for c in compared}
    assert by_group[("sex", "male")]["worse"] and by_group[("sex", "male")]["high"] < 0
    # The female group's one missed melanoma (of 2, in two lesions) is within what the bootstrap allows: the
    # resamples without its lesion show no loss.
    assert by_group[("sex", "female")]["difference"] == -0.5 and not by_group[("sex", "female")]["worse"]
    reason = subgroups.verdict(compared, 2)
    assert reason.startswith("subgroup gate: melanoma sensitivity in ") and "against the champion's 1.0000" in reason
    assert subgroups.verdict(table.compare(flagged, flagged, 2), 2) is None


def test_a_batch_unlike_the_prior_or_mostly_out_of_distribution_alerts():
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    common = {"run": "b1", "images": "s3://b/in", "predictions_uri": "s3://b/p.csv", "model": {}, "classes": CLASSES,
              "prior": prior, "max_class_mix_shift": 0.3, "max_ood_rate": 0.2}  # fmt: skip
    calm = monitoring.batch_record(argmax_counts=np.round(prior * 100), decisions={"decided": 95, "refer": 5},
                                   **common)  # fmt: skip
    assert calm["alerts"] == [] and calm["class_mix_shift"] < 0.01 and calm["referral_rate"] == 0.05
    melanomas = np.zeros(len(CLASSES))
    melanomas[CLASSES.index("mel")] = 60
    shifted = monitoring.batch_record(argmax_counts=melanomas, decisions={"decided": 60, "out_of_distribution": 40},
                                      **common)  # fmt: skip
    assert shifted["class_mix_shift"] == pytest.approx(0.89) and shifted["ood_rate"] == 0.4
    assert len(shifted["alerts"]) == 2 and "mel 100.0% (prior 11.0%)" in shifted["alerts"][0]
    assert "40.0% of the images are out of distribution (40 of 100), over the bound 20.0%" in shifted["alerts"][1]


# -- the stages -------------------------------------------------------------------------------------------
def _test_split(store, small_split, tmp_path):
    split = S3Uri.parse(small_split["split_uri"])
    test = read_csv(store, split.join("test.csv"))
    dataset = Dataset.open(store, small_split["dataset_uri"], tmp_path)
    return test, dataset


def test_evaluate_reports_subgroups_referral_and_out_of_distribution(
    small_split, guarded_model, run_stage, bucket, store, tmp_path
):
    from dermaops.checkpoint import load_checkpoint
    from dermaops.guards import detector, features, referral_threshold
    from dermaops.imagecache import load_images
    from dermaops.models import predict_proba
    from dermaops.predictor import apply_temperature

    out = S3Uri.parse(f"s3://{bucket.bucket}/runs/guarded/evaluation")
    argv = ["evaluate", "--split", small_split["split_uri"], "--model", guarded_model, "--out", str(out)]
    summary = run_stage(*argv, "--no-score-phase1", "--bootstrap-resamples", "400", "--no-gradcam").summary
    metrics = store.get_json(out.join("metrics.json"))
    test, dataset = _test_split(store, small_split, tmp_path)
    images = load_images(Context(store, tmp_path), dataset, 28).rows(test["image_id"].tolist())
    model, meta = load_checkpoint(store.download(S3Uri.parse(guarded_model).join("cnn.pt"), tmp_path / "g.pt"))
    proba = apply_temperature(predict_proba(model, images, meta, tta=True), meta.temperature)
    labels, mel = test["label"].to_numpy(), CLASSES.index("mel")

    # Subgroups: every group of the four attributes, its counts and figures recomputed from the test split.
    sub = metrics["test"]["subgroups"]
    assert sub["attributes"] == ["sex", "age_band", "localization", "dx_type"] and sub["resamples"] == 400
    groups = subgroups.group_labels(test, sub["localizations"])
    for g in sub["groups"]:
        rows = groups[g["attribute"]] == g["group"]
        assert g["n"] == rows.sum() and g["lesions"] == test["lesion_id"][rows].nunique(), g
        assert g["small"] == (g["lesions"] < subgroups.SMALL_LESIONS)
        assert np.isclose(g["accuracy"]["value"], (proba[rows].argmax(1) == labels[rows]).mean())
        flagged = proba[rows, mel] >= meta.mel_threshold
        is_mel = labels[rows] == mel
        if is_mel.any():
            assert np.isclose(g["mel_sensitivity"]["value"], flagged[is_mel].mean())
        else:
            assert g["mel_sensitivity"]["value"] is None
        every_class = set(labels[rows]) == set(range(len(CLASSES)))
        assert (g["macro_f1"]["value"] is not None) == every_class
        for name in subgroups.FIGURES:
            entry = g[name]
            if entry["value"] is not None and entry["low"] is not None:
                assert entry["low"] - 1e-9 <= entry["value"] <= entry["high"] + 1e-9, (g["group"], name)
    assert sum(g["n"] for g in sub["groups"] if g["attribute"] == "sex") == len(test)
    assert {g["group"] for g in sub["groups"] if g["attribute"] == "localization"} <= {*sub["localizations"], "other"}

    # Referral: the risk-coverage curve's AURC and the validation-chosen threshold's test figures.
    ref = metrics["test"]["referral"]
    conf, correct = proba.max(1), proba.argmax(1) == labels
    assert np.isclose(ref["aurc"], selective.risk_coverage(conf, correct).aurc)
    assert summary["aurc"] == round(ref["aurc"], 4)
    threshold = referral_threshold(meta)
    assert ref["test"]["threshold"] == threshold and ref["target_accuracy"] == 0.6
    assert np.isclose(ref["test"]["coverage"], (conf >= threshold).mean())
    assert np.isclose(ref["test"]["accuracy"], correct[conf >= threshold].mean())
    assert 0 < ref["test"]["coverage"] < 1 and ref["test"]["decided"] + ref["test"]["referred"] == len(test)
    assert ref["fitted"]["fitted_on"] == "val"

    # Out of distribution: false flags on the genuine test images, detection of their corrupted copies.
    found = detector(meta)
    flags = found.flags(features(model, images, meta, 256, "cpu"))
    got = metrics["test"]["ood"]
    assert np.isclose(got["false_flag_rate"], flags.mean()) and got["threshold"] == found.threshold
    assert set(got["detection"]) == set(ood.CORRUPTIONS) and all(0 <= r <= 1 for r in got["detection"].values())
    assert summary["ood"]["false_flag_rate"] == round(got["false_flag_rate"], 4)

    for name in ("subgroups_mel_sensitivity.png", "risk_coverage.png"):
        assert store.get_bytes(out.join(name)).startswith(PNG)
    table = read_csv(store, out.join("subgroups.csv"))
    assert len(table) == len(sub["groups"]) and "mel_sensitivity_low" in table.columns
    report = store.get_bytes(out.join("report.md")).decode()
    for heading in ("## Subgroups", "## Referral (selective prediction)", "## Out-of-distribution inputs"):
        assert heading in report
    male = next(g for g in sub["groups"] if (g["attribute"], g["group"]) == ("sex", "male"))
    assert f"| sex | male{' **small**' if male['small'] else ''} | {male['n']} | {male['lesions']} |" in report
    assert "](subgroups_mel_sensitivity.png)" in report and "](risk_coverage.png)" in report


def test_predict_refers_flags_what_is_not_dermatoscopy_and_alerts_on_the_batch(
    guarded_model, pack_sample, run_stage, store, bucket, tmp_path, slack_api
):
    folder = tmp_path / "batch"
    genuine = sample_jpegs(pack_sample, folder)
    photos = photograph_jpegs(folder)
    corrupted = corrupted_jpegs(genuine[:20], folder)
    registry = f"s3://{bucket.bucket}/registry/ham10000"
    out = f"s3://{bucket.bucket}/predictions/mixed"
    argv = ["predict", "--model", guarded_model, "--images", str(folder), "--out", out, "--registry", registry]
    result = run_stage(*argv, "--no-tta", env=slack_api.env())
    summary = result.summary
    table = read_csv(store, S3Uri.parse(out).join("predictions.csv")).set_index("image")
    n = len(genuine) + len(photos) + sum(len(v) for v in corrupted.values())
    assert summary["n_images"] == len(table) == n
    assert sum(summary["decisions"].values()) == n

    unlike = table[table["decision"] == "out_of_distribution"]
    # Never a diagnosis, a probability or a melanoma flag for an image unlike the training data.
    assert unlike["predicted"].isna().all() and unlike[[f"p_{c}" for c in CLASSES]].isna().all().all()
    assert unlike["mel_flag"].isna().all() and (unlike["ood_score"] > summary["ood_threshold"]).all()
    photo_rate = table.loc[[p.name for p in photos], "decision"].eq("out_of_distribution").mean()
    genuine_rate = table.loc[[p.name for p in genuine], "decision"].eq("out_of_distribution").mean()
    assert photo_rate >= 0.8, f"only {photo_rate:.0%} of the {len(PHOTOGRAPHS)} photographs were flagged"
    assert genuine_rate <= 0.2, f"{genuine_rate:.0%} of the genuine full-resolution images were flagged"
    referred = table[table["decision"] == "refer"]
    decided = table[table["decision"] == "decided"]
    assert referred["predicted"].isna().all() and (referred["confidence"] < summary["referral_threshold"]).all()
    assert (decided["confidence"] >= summary["referral_threshold"]).all()
    p = decided[[f"p_{c}" for c in CLASSES]].to_numpy(dtype=float)
    assert (decided["predicted"] == np.array(CLASSES)[p.argmax(1)]).all()
    assert summary["predicted_counts"] == {c: int((decided["predicted"] == c).sum()) for c in CLASSES}

    # Monitoring: the batch is recorded in the registry and, a third of it unlike dermatoscopy, alerts Slack.
    recorded = summary["monitoring"]
    record = store.get_json(recorded["record_uri"])
    assert record["ood_rate"] == pytest.approx(summary["decisions"]["out_of_distribution"] / n, abs=1e-6)
    assert record["ood_rate"] > record["bounds"]["ood_rate"] and recorded["alert_posted"] is True
    assert sum(record["class_mix"].values()) == pytest.approx(1.0, abs=1e-4) and record["train_prior"]["nv"] > 0.1
    [message] = slack_api.messages
    assert message["channel"] == CHANNEL and "prediction monitoring" in message["text"]
    text = block_text(message["blocks"])
    assert "out of distribution" in text and f"over the bound {record['bounds']['ood_rate']:.1%}" in text
    assert record["alert_posted"]["ts"]

    # Genuine dermatoscopy only, under generous bounds: recorded, no alert.
    calm = run_stage(
        "predict", "--model", guarded_model, "--images", str(pack_sample), "--out", f"{out}-calm", "--registry",
        registry, "--no-tta", "--max-class-mix-shift", "1", "--max-ood-rate", "0.5", env=slack_api.env(),
    ).summary  # fmt: skip
    assert calm["monitoring"]["alerts"] == [] and len(slack_api.messages) == 1
    assert len(monitoring.read_all(store, S3Uri.parse(registry))) == 2
