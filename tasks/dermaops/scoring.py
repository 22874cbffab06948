"""Scoring checkpoints on a test split: what evaluate reports, computed from one pass per model.

`SplitScorer` loads the test images once per frame, draws the lesion-bootstrap resamples once, and scores
a checkpoint's Predictor (dermaops.predictor) on every symmetry view of its frame (`Scored`: the softmax of
each view, before the logit adjustment and the temperature). Every figure of the evaluation (metrics with
and without TTA, the adjustment or the temperature; calibration; the melanoma operating point; subgroups;
referral; out-of-distribution checks; the champion's re-scoring and the paired comparison) is derived from
those stored views without scoring the model again. Library code: the evaluate stage runs it, benchmarks and
tests use it directly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dermaops.errors import StageError

log = logging.getLogger(__name__)

# The headline figures each ablation variant reports.
ABLATION_KEYS = ("accuracy", "macro_f1", "macro_auc", "mel_recall")


@dataclass
class Scored:
    """One checkpoint's test-split outputs: the softmax of each scored view, before the logit adjustment
    and the temperature. Every variant evaluate reports (with or without TTA, adjustment, temperature)
    is derived from these without scoring the model again."""

    predictor: object  # dermaops.predictor.Predictor
    views: object  # (V, N, C) float32: V = 1, or the frame's symmetry views (view 0 = the image as it is)

    @property
    def model(self):
        return self.predictor.model

    @property
    def meta(self):
        return self.predictor.meta

    def proba(self, tta: bool, adjust: bool = True, temperature: bool = True):
        """The probabilities as Predictor.softmax gives them (mean softmax over the views with `tta`), then
        the checkpoint's logit adjustment and temperature, as every consumer applies them."""
        if tta and len(self.views) == 1:
            raise ValueError("test-time augmentation asked of a model scored on one view")
        softmax = self.views.mean(axis=0) if tta else self.views[0]
        return self.predictor.calibrate(softmax, adjust=adjust, temperature=temperature)


def dihedral_views_uint8(images, k: int):
    """View `k` of uint8 NHWC images, equal to models.dihedral_view of the NCHW tensor (k % 4 quarter
    turns from the first spatial axis towards the second, then a left-right mirror for k >= 4)."""
    import numpy as np

    view = np.rot90(images, k % 4, axes=(1, 2))
    return np.ascontiguousarray(view[:, :, ::-1] if k >= 4 else view)


class SplitScorer:
    """Scores models on one test split; images are loaded once per image size (the champion or the
    baseline may use another size than the challenger), the bootstrap resamples drawn once."""

    def __init__(self, ctx, dataset, test, batch_size: int, device: str, tta: bool = True, resamples: int = 1000):
        from dermaops.dataset import CLASSES

        self.ctx, self.dataset, self.test = ctx, dataset, test
        self.batch_size, self.device, self.tta = batch_size, device, tta
        self.n_resamples = resamples
        self.classes = CLASSES
        self.mel = CLASSES.index("mel")
        self.labels = test["label"].to_numpy()
        self.image_ids = test["image_id"].tolist()
        # Images of one lesion are resampled together; a split without lesion ids falls back to images.
        self.groups = (test["lesion_id"] if "lesion_id" in test.columns else test["image_id"]).to_numpy()
        self._images: dict[object, object] = {}  # Frame -> uint8 images
        self._resamples = None

    def images(self, frame):
        """The test images in `frame` (a Frame, or a bare size: squashed), loaded once per frame."""
        from dermaops.frame import Frame

        frame = Frame.of(frame)
        if frame not in self._images:
            from dermaops.imagecache import load_images

            self._images[frame] = load_images(self.ctx, self.dataset, frame).rows(self.image_ids)
        return self._images[frame]

    @property
    def resamples(self):
        if self._resamples is None:
            from dermaops.bootstrap import Resamples

            self._resamples = Resamples.of(self.groups, self.n_resamples)
        return self._resamples

    def metrics(self, proba) -> dict:
        from dermaops.metrics import classification_metrics

        return classification_metrics(self.labels, proba.argmax(axis=1), proba, self.classes)

    def score_checkpoint(self, path: Path, what: str, all_views: bool | None = None) -> Scored:
        """A checkpoint scored on every symmetry view of its frame (`all_views`, default: with TTA) or on the
        image as it is; StageError if it is not one of ours or predicts other classes."""
        import numpy as np

        from dermaops.models import symmetry_views
        from dermaops.predictor import Predictor

        predictor = Predictor.load(path, self.device, classes=self.classes, what=what)
        meta = predictor.meta
        frame = meta.frame
        images = self.images(frame)
        views = symmetry_views(frame.shape) if (self.tta if all_views is None else all_views) else (0,)
        started = time.monotonic()
        # One log line per model scored keeps the container's log alive (Docker log streaming).
        log.info("scoring %s (%s, %s, %d view(s)) on %d test images",
                 what, meta.arch, frame.describe(), len(views), len(images))  # fmt: skip
        per_view = np.stack(
            [predictor.softmax(dihedral_views_uint8(images, k), batch_size=self.batch_size) for k in views]
        )
        log.info("scored %s in %.1f s", what, time.monotonic() - started)
        require_finite(per_view.sum(axis=0), what)  # NaN/inf in any view of an image propagates to its sum
        return Scored(predictor, per_view)

    def ablation(self, scored: Scored) -> dict:
        """Headline test metrics of the model with each inference-time component switched off (or, for TTA
        when it is off, on) in turn, derived from its stored views: what each contributes."""
        from dermaops.metrics import headline

        variants = {}
        if self.tta:
            variants["tta_off"] = {"tta": False}
        elif len(scored.views) > 1:
            variants["tta_on"] = {"tta": True}
        if scored.meta.logit_bias is not None:
            variants["logit_adjustment_off"] = {"tta": self.tta, "adjust": False}
        return {
            name: headline(self.metrics(scored.proba(**kwargs)), ABLATION_KEYS) for name, kwargs in variants.items()
        }

    def calibration(self, scored: Scored) -> dict:
        """Test ECE (15 bins) and reliability bins of the probabilities without and with the checkpoint's
        temperature (fitted on validation by train)."""
        from dermaops.calibration import ECE_BINS, reliability

        temperature = scored.predictor.temperature
        before = reliability(scored.proba(self.tta, temperature=False), self.labels, ECE_BINS)
        after = reliability(scored.proba(self.tta), self.labels, ECE_BINS) if temperature else None
        return {
            "temperature": temperature,
            "fitted": scored.meta.calibration,
            "ece_before": before["ece"],
            "ece_after": after["ece"] if after else None,
            "reliability_before": before,
            "reliability_after": after,
        }

    def operating_point(self, scored: Scored, proba) -> dict | None:
        """Test sensitivity and specificity of the checkpoint's melanoma threshold, with lesion-bootstrap
        intervals; None when the checkpoint carries no threshold."""
        from dermaops.bootstrap import interval, resample_metrics

        point = scored.predictor.point
        if point.threshold is None:
            return None
        samples = resample_metrics(self.resamples.weights, self.labels, proba, self.mel, point.threshold, False)
        is_mel = self.labels == self.mel
        flagged = point.flags(proba, self.mel)
        fitted = scored.meta.calibration or {}
        out = {
            "threshold": point.threshold,
            "rule": point.rule,
            "target_sensitivity": fitted.get("mel_target_sensitivity"),
            "val_sensitivity": fitted.get("val_mel_sensitivity"),
            "n_mel": int(is_mel.sum()),
            "n_other": int((~is_mel).sum()),
        }
        for name, hits in (("sensitivity", flagged[is_mel]), ("specificity", ~flagged[~is_mel])):
            low, high = interval(samples[f"mel_{name}"])
            out[name] = float(hits.mean()) if len(hits) else None
            out[f"{name}_ci"] = [low, high]
        return out

    def intervals(self, proba, mel_threshold: float | None = None) -> dict:
        from dermaops.bootstrap import HEADLINE_CI, confidence_intervals

        started = time.monotonic()
        out = confidence_intervals(self.resamples, self.labels, proba, self.mel, mel_threshold)
        log.info("%d lesion-bootstrap resamples in %.2f s", self.resamples.n, time.monotonic() - started)
        return {name: out[name] for name in HEADLINE_CI if name in out}

    @cached_property
    def subgroup_table(self):
        """The test split's subgroups (dermaops.subgroups), sharing the headline figures' lesion resamples."""
        from dermaops.subgroups import Subgroups, group_labels, largest_localizations

        sites = largest_localizations(self.dataset.metadata)
        return Subgroups(self.labels, self.groups, group_labels(self.test, sites), sites, self.resamples.weights,
                         self.mel, len(self.classes))  # fmt: skip

    def subgroups(self, scored: Scored, proba) -> dict:
        """Every subgroup's figures, the melanoma flag at the checkpoint's operating point."""
        point = scored.predictor.point
        started = time.monotonic()
        out = self.subgroup_table.figures(proba, point.flags(proba, self.mel), point.rule)
        log.info(
            "%d subgroups with lesion-bootstrap intervals in %.2f s", len(out["groups"]), time.monotonic() - started
        )
        return out

    def subgroup_check(self, min_melanomas: int):
        """The subgroup gate's comparison (dermaops.promotion.SubgroupCheck): each model's melanoma flag at its
        own operating point (the champion's from champion.json first, as predict reads it), paired per group."""
        from dermaops.predictor import operating_point
        from dermaops.subgroups import verdict

        def check(challenger_proba, challenger_meta, champion_proba, champion_meta, record: dict) -> dict:
            challenger = operating_point(challenger_meta, None).flags(challenger_proba, self.mel)
            champion = operating_point(champion_meta, record).flags(champion_proba, self.mel)
            compared = self.subgroup_table.compare(challenger, champion, min_melanomas)
            return {"min_melanomas": min_melanomas, "groups": compared, "refusal": verdict(compared, min_melanomas)}

        return check

    def risk_coverage(self, proba):
        from dermaops.selective import confidence, risk_coverage

        return risk_coverage(confidence(proba), proba.argmax(axis=1) == self.labels)

    def referral(self, proba, meta) -> dict:
        """The test risk-coverage curve and AURC; with the checkpoint's referral threshold (chosen on validation),
        the test coverage and accuracy of the decided images at it, with lesion-bootstrap intervals, and the
        coverage the test curve itself has at the target (for reference: chosen on test, never used)."""
        import numpy as np

        from dermaops.bootstrap import interval
        from dermaops.guards import referral_threshold
        from dermaops.selective import confidence, weighted_at_threshold

        curve = self.risk_coverage(proba)
        out = {"aurc": curve.aurc, "n": len(self.labels), "curve": curve.thinned(), "test": None}
        threshold = referral_threshold(meta)
        if threshold is None:
            return {**out, "fitted": None}
        fitted = meta.referral
        conf, correct = confidence(proba), proba.argmax(axis=1) == self.labels
        (coverage,), (accuracy,) = weighted_at_threshold(np.ones((1, len(conf)), dtype=np.float32), conf, correct,
                                                         threshold)  # fmt: skip
        coverage_b, accuracy_b = weighted_at_threshold(self.resamples.weights, conf, correct, threshold)
        target = fitted.get("target_accuracy")
        oracle, _ = curve.coverage_at_accuracy(target) if target is not None else (None, None)
        out["test"] = {
            "threshold": threshold,
            "coverage": float(coverage),
            "coverage_ci": list(interval(coverage_b)),
            "accuracy": None if np.isnan(accuracy) else float(accuracy),
            "accuracy_ci": list(interval(accuracy_b)),
            "decided": int((conf >= threshold).sum()),
            "referred": int((conf < threshold).sum()),
        }
        return {**out, "fitted": fitted, "target_accuracy": target, "test_coverage_at_target_on_test": oracle}

    def out_of_distribution(self, scored: Scored) -> dict | None:
        """With the checkpoint's detector: the share of the (in-distribution) test images it flags, with a
        lesion-bootstrap interval, and the share of corrupted copies of them it detects, per corruption
        (dermaops.ood: each test JPEG blurred, overexposed, turned with a black border, then decoded as predict
        decodes). None for a checkpoint without one."""
        import numpy as np

        from dermaops.bootstrap import interval
        from dermaops.guards import detector, features
        from dermaops.imagecache import decode_image
        from dermaops.ood import CORRUPTION_TEXT, CORRUPTIONS, corrupt

        found = detector(scored.meta)
        if found is None:
            return None
        started = time.monotonic()
        frame = scored.meta.frame

        def flags(images):
            return found.flags(features(scored.model, images, scored.meta, self.batch_size, self.device))

        flagged = flags(self.images(frame)).astype(np.float32)
        wanted = set(self.image_ids)
        raw = {image_id: data for image_id, _, data in self.dataset.iter_images() if image_id in wanted}
        detection = {}
        for kind in CORRUPTIONS:
            corrupted = np.stack([decode_image(corrupt(raw[i], kind, i), frame, i) for i in self.image_ids])
            detection[kind] = float(flags(corrupted).mean())
        samples = (self.resamples.weights @ flagged) / self.resamples.weights.sum(axis=1)
        log.info("out-of-distribution checks in %.1f s: false flags %.4f on test, detection %s",
                 time.monotonic() - started, flagged.mean(), detection)  # fmt: skip
        fitted = scored.meta.record()["ood"]
        return {
            "fitted": fitted,
            "threshold": found.threshold,
            "false_flag_rate": float(flagged.mean()),
            "false_flag_rate_ci": list(interval(samples)),
            "n_test": len(flagged),
            "detection": detection,
            "corruptions": {kind: CORRUPTION_TEXT[kind] for kind in CORRUPTIONS},
        }

    def score_champion(self, path: Path):
        """(test metrics, test probabilities) of the registered champion, scored like the challenger; the metrics
        carry its checkpoint's meta (`meta`, a CheckpointMeta) for the subgroup gate. Any failure
        to rebuild it (architecture or tensor shapes its meta does not match) is a StageError: the gate then
        treats it as no champion."""
        try:
            scored = self.score_checkpoint(path, what="the champion checkpoint")
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise StageError(f"the champion checkpoint does not load ({type(exc).__name__}: {exc})") from exc
        proba = scored.proba(self.tta)
        return {**self.metrics(proba), "meta": scored.meta}, proba

    def compare(self, proba_challenger, proba_champion, metric: str) -> dict:
        """Paired lesion bootstrap of metric(challenger) - metric(champion) on these same test images."""
        from dermaops.bootstrap import paired_difference

        return paired_difference(self.resamples, self.labels, proba_challenger, proba_champion, metric, self.mel)

    def score_baseline(self, path: Path) -> dict:
        import joblib

        from dermaops.baseline import score_bundle

        bundle = joblib.load(path)
        from dermaops.frame import Frame

        frame = Frame.from_meta(bundle["meta"])
        log.info("scoring the baseline (random forest, features of %s) on %d test images",
                 frame.describe(), len(self.test))  # fmt: skip
        return self.metrics(score_bundle(bundle, self.images(frame), self.classes))


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
