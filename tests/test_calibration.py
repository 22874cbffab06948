"""Unit tests of the evaluation math on synthetic data with known answers: temperature scaling, ECE, the
melanoma operating point, lesion-level bootstrap intervals, the paired comparison, the Grad-CAM layer
choice and the localization ratio, and the derived test-time-augmentation views."""

from __future__ import annotations

import time

import numpy as np
import pytest
from dermaops.bootstrap import Resamples, confidence_intervals, paired_difference, resample_metrics
from dermaops.calibration import (
    expected_calibration_error,
    fit,
    fit_temperature,
    reliability,
    scale,
    sensitivity_specificity,
    threshold_for_sensitivity,
)
from dermaops.metrics import classification_metrics
from dermaops.promotion import Floors, GatePolicy, decide

MEL = 4


def _sample_labels(rng, proba: np.ndarray) -> np.ndarray:
    cumulative = proba.cumsum(axis=1)
    return (rng.random((len(proba), 1)) > cumulative).sum(axis=1).clip(0, proba.shape[1] - 1)


def test_temperature_scaling_recovers_a_known_temperature_and_fixes_calibration():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20_000, 7)) * 3
    labels = _sample_labels(rng, scale(logits, 2.5))  # the truth is softmax(logits / 2.5): T = 2.5
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.04)
    before = expected_calibration_error(scale(logits, None), labels)
    after = expected_calibration_error(scale(logits, temperature), labels)
    assert before > 0.15 and after < 0.02
    # The argmax never changes: accuracy is the same before and after.
    assert (scale(logits, temperature).argmax(1) == logits.argmax(1)).all()


def test_an_uninformative_model_gets_the_bound_temperature_not_a_failure():
    """Labels independent of the logits: the NLL optimum is T -> infinity (uniform); the fit stores the
    upper bound, the constrained optimum (NLL is convex in 1/T), instead of failing the training."""
    from dermaops.calibration import TEMPERATURE_RANGE

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2_000, 7)) * 3
    labels = rng.integers(0, 7, size=2_000)
    assert fit_temperature(logits, labels) == TEMPERATURE_RANGE[1]


def test_ece_and_reliability_bins_by_hand():
    # Two bins used (15 equal-width bins): 4 images at confidence 0.9 with 3 right, 2 at 0.5 with 2 right.
    proba = np.array([[0.9, 0.1]] * 4 + [[0.5, 0.5]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 0])
    stats = reliability(proba, labels, 15)
    # |0.75 - 0.9| * 4/6 + |1.0 - 0.5| * 2/6
    assert stats["ece"] == pytest.approx(0.15 * 4 / 6 + 0.5 * 2 / 6)
    assert sum(stats["count"]) == 6 and stats["count"][13] == 4 and stats["count"][7] == 2
    assert stats["accuracy"][13] == pytest.approx(0.75) and stats["confidence"][7] == pytest.approx(0.5)
    assert stats["confidence"][0] is None  # an empty bin has no mean


def test_the_melanoma_threshold_is_the_highest_that_reaches_the_target_sensitivity():
    p_mel = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.85, 0.05])
    is_mel = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    threshold = threshold_for_sensitivity(p_mel, is_mel, 0.85)  # 9 of the 10 melanomas: the 9th highest
    assert threshold == pytest.approx(0.2)
    sensitivity, specificity = sensitivity_specificity(p_mel, is_mel, threshold)
    assert sensitivity == pytest.approx(0.9) and specificity == pytest.approx(0.5)
    assert sensitivity_specificity(p_mel, is_mel, 0.2 + 1e-9)[0] < 0.85  # any higher threshold misses the target
    assert threshold_for_sensitivity(p_mel, is_mel, 1.0) == pytest.approx(0.1)

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2000, 7)) + 2 * np.eye(7)[rng.integers(0, 7, 2000)]
    labels = _sample_labels(rng, scale(logits, 0.5))
    fitted = fit(scale(logits, None), labels, MEL, 0.85)
    assert fitted["calibration"]["val_mel_sensitivity"] >= 0.85
    assert fitted["calibration"]["val_ece_after"] < fitted["calibration"]["val_ece_before"]
    assert fitted["temperature"] == pytest.approx(0.5, rel=0.1)


def _synthetic(n: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[y]
    # Rounded logits give tied scores, which the AUC must count one half like sklearn.
    proba = scale(np.round(logits, 1), None)
    groups = rng.integers(0, int(n * 0.75), size=n)  # about 1.3 images per lesion, as in HAM10000
    return y, proba, groups


def test_bootstrap_with_unit_weights_reproduces_the_metrics_and_resamples_whole_lesions():
    y, proba, groups = _synthetic()
    point = resample_metrics(np.ones((1, len(y))), y, proba, MEL, 0.3)
    expected = classification_metrics(y, proba.argmax(1), proba)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc"):
        assert point[name][0] == pytest.approx(expected[name], abs=1e-12), name
    assert point["mel_recall"][0] == pytest.approx(expected["per_class"]["mel"]["recall"])
    assert point["mel_sensitivity"][0] == pytest.approx(sensitivity_specificity(proba[:, MEL], y == MEL, 0.3)[0])

    resamples = Resamples.of(groups, 200, seed=7)
    w = resamples.weights
    assert w.shape == (200, len(y)) and resamples.n_groups == len(np.unique(groups))
    # Each resample draws as many lesions as there are, and all images of a lesion come together.
    first_image = {g: np.flatnonzero(groups == g)[0] for g in np.unique(groups)}
    assert np.allclose(w[:, list(first_image.values())].sum(axis=1), resamples.n_groups)
    for g in list(first_image)[:50]:
        members = np.flatnonzero(groups == g)
        assert (w[:, members] == w[:, members[:1]]).all()
    assert np.array_equal(w, Resamples.of(groups, 200, seed=7).weights)  # seeded


def test_intervals_contain_the_estimate_narrow_with_more_images_and_are_fast():
    y, proba, groups = _synthetic()
    started = time.monotonic()
    ci = confidence_intervals(Resamples.of(groups, 1000), y, proba, MEL, 0.3)
    seconds = time.monotonic() - started
    for name, entry in ci.items():
        assert entry["low"] <= entry["value"] <= entry["high"], name
        assert entry["high"] - entry["low"] > 0, name
    y4, proba4, groups4 = _synthetic(4000, seed=3)
    wide = ci["accuracy"]["high"] - ci["accuracy"]["low"]
    ci4 = confidence_intervals(Resamples.of(groups4, 1000), y4, proba4, MEL)
    assert ci4["accuracy"]["high"] - ci4["accuracy"]["low"] < 0.75 * wide  # about 1/2 for 4x the images
    # The bound is 2 s for 1,000 images; the assert leaves room for a machine shared by other jobs.
    assert seconds < 5, f"1000 resamples of 1000 images took {seconds:.2f} s"


def test_paired_bootstrap_of_identical_and_of_clearly_different_models():
    y, proba, groups = _synthetic()
    resamples = Resamples.of(groups, 1000)
    same = paired_difference(resamples, y, proba, proba, "macro_f1", MEL)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0
    worse = scale(np.log(proba) + np.random.default_rng(5).normal(scale=1.5, size=proba.shape), None)
    better = paired_difference(resamples, y, proba, worse, "macro_f1", MEL)
    assert better["difference"] > 0 and better["low"] > 0 and better["low"] < better["difference"] < better["high"]
    assert better["resamples"] == 1000 and better["images"] == len(y)

    challenger = {"macro_f1": 0.60, "macro_auc": 0.9, "per_class": {"mel": {"recall": 0.6}}}
    champion = {"macro_f1": 0.58, "macro_auc": 0.9, "per_class": {"mel": {"recall": 0.6}}}
    policy = GatePolicy(margin=0.005, floors=Floors(0.5, 0.0, 0.0))  # the gate's rule 5 alone
    interval = {"difference": 0.02, "low": -0.01, "high": 0.05, "level": 0.95, "resamples": 1000, "lesions": 750}
    refused = decide(challenger, champion, policy, baseline={"macro_f1": 0.0}, paired=interval)
    # The point difference clears the margin, the lower bound does not: the champion stays.
    assert not refused.promoted and "lower bound -0.0100 does not clear the margin" in refused.reason
    assert "[-0.0100, +0.0500]" in refused.reason
    sure = decide(challenger, champion, policy, baseline={"macro_f1": 0.0}, paired={**interval, "low": 0.006})
    assert sure.promoted and "lower bound +0.0060 clears the margin 0.0050" in sure.reason


def test_derived_tta_views_equal_predict_proba_and_the_gradcam_layer_is_chosen_for_resolution():
    import torch
    from dermaops.checkpoint import CheckpointMeta
    from dermaops.dataset import CLASSES
    from dermaops.frame import Frame
    from dermaops.gradcam import pick_target_layer
    from dermaops.models import build_model, predict_proba
    from dermaops.scoring import dihedral_views_uint8

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28, 3), dtype=np.uint8)
    meta = CheckpointMeta.for_model("resnet18", CLASSES, Frame("squash", 28), "auto", "none")
    model = build_model("resnet18", 7, 28).eval()
    views = np.stack([predict_proba(model, dihedral_views_uint8(images, k), meta) for k in range(8)])
    assert np.allclose(views.mean(axis=0), predict_proba(model, images, meta, tta=True), atol=1e-6)
    assert not np.allclose(views[0], views[5], atol=1e-6)  # the views really differ

    # The deepest module with a map >= 6x6: small stem at 28 px -> layer3 (7x7); ImageNet stem at 48 px ->
    # layer2 (6x6; layer3 is 3x3); at 224 px layer4 is already 7x7.
    assert pick_target_layer(model, meta)[1:] == ("layer3", (7, 7))
    at_48 = build_model("resnet18", 7, 48)
    assert pick_target_layer(at_48, meta.replace(image_size=48))[1:] == ("layer2", (6, 6))
    at_224 = build_model("resnet18", 7, 224)
    assert pick_target_layer(at_224, meta.replace(image_size=224))[1:] == ("layer4", (7, 7))


def test_localization_ratio_of_a_dark_lesion():
    from dermaops.gradcam import energy_ratios, lesion_mask, otsu_masks

    yy, xx = np.mgrid[:28, :28]
    inside = (yy - 14) ** 2 + (xx - 14) ** 2 <= 49  # a dark disk on light skin
    image = np.where(inside[..., None], np.array([90, 50, 40]), np.array([220, 180, 170])).astype(np.uint8)
    assert (lesion_mask(image) == inside).all()
    area = inside.mean()
    on_lesion, uniform, off_lesion = inside.astype(float), np.ones((28, 28)), (~inside).astype(float)
    maps = np.stack([on_lesion, uniform, off_lesion, np.zeros((28, 28))])
    ratios = energy_ratios(maps, otsu_masks(np.stack([image] * 4)))
    assert ratios[0] == pytest.approx(1 / area) and ratios[1] == pytest.approx(1.0) and ratios[2] == 0
    assert np.isnan(ratios[3])  # no mass: undefined, left out of the mean
