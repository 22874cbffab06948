"""Selective prediction: refer an image to a clinician instead of forcing a guess when the model is unsure.

The confidence of a prediction is its largest calibrated probability (what `predict` reports, after the
logit adjustment and the temperature). Deciding only the images whose confidence reaches a threshold trades
coverage (the share decided) for accuracy on the decided ones:

- the risk-coverage curve (Geifman and El-Yaniv, 2017): images sorted by confidence, most confident first;
  at each threshold the coverage and the risk (error rate) of the decided images. Images of equal
  confidence cannot be split by a threshold, so the curve has a point per distinct confidence.
- AURC, the area under it (Geifman et al., 2019): the mean risk over coverages; lower is better. A model
  whose confidence ranks its errors last has AURC near risk^2 / 2, one whose confidence says nothing has
  AURC near its overall error rate.
- the threshold for a target accuracy, chosen on VALIDATION by train: the lowest confidence threshold
  whose decided validation images reach the target accuracy, so the most images are decided at it.
  Evaluate reports the test coverage and accuracy at that stored threshold (dermaops.guards holds it in
  the checkpoint's meta), with lesion-bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DECIDED, REFER = "decided", "refer"


def confidence(proba: np.ndarray) -> np.ndarray:
    """The confidence of each prediction: its largest probability."""
    return np.asarray(proba, dtype=np.float64).max(axis=1)


@dataclass(frozen=True)
class Curve:
    """The risk-coverage curve: one point per distinct confidence, from the most confident down."""

    threshold: np.ndarray  # decide when confidence >= threshold
    coverage: np.ndarray  # share of images decided at it
    risk: np.ndarray  # error rate of the decided images

    @property
    def aurc(self) -> float:
        """Area under the curve by steps from coverage 0 (with no ties: the mean of the risk after each image)."""
        widths = np.diff(np.r_[0.0, self.coverage])
        return float(np.sum(self.risk * widths))

    def coverage_at_accuracy(self, target: float) -> tuple[float, float | None]:
        """(the largest coverage whose accuracy reaches `target`, its threshold); (0, None) when none does."""
        ok = 1 - self.risk >= target - 1e-12
        if not ok.any():
            return 0.0, None
        best = np.flatnonzero(ok)[-1]
        return float(self.coverage[best]), float(self.threshold[best])

    def thinned(self, points: int = 200) -> dict:
        """The curve as JSON, at most `points` points (evenly spread over its length, the ends kept)."""
        keep = np.unique(np.linspace(0, len(self.coverage) - 1, min(points, len(self.coverage))).round().astype(int))
        return {
            "threshold": [round(float(v), 6) for v in self.threshold[keep]],
            "coverage": [round(float(v), 6) for v in self.coverage[keep]],
            "risk": [round(float(v), 6) for v in self.risk[keep]],
        }


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> Curve:
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if conf.shape != correct.shape or conf.ndim != 1 or len(conf) == 0:
        raise ValueError(f"confidence {conf.shape} and correctness {correct.shape} must be equal-length, non-empty 1-d")
    order = np.argsort(-conf, kind="stable")
    sorted_conf = conf[order]
    errors = np.cumsum(~correct[order])
    # The last image of each run of equal confidences: a threshold decides the whole run or none of it.
    ends = np.flatnonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])
    decided = ends + 1
    return Curve(sorted_conf[ends], decided / len(conf), errors[ends] / decided)


def threshold_for_accuracy(conf: np.ndarray, correct: np.ndarray, target: float) -> dict:
    """The referral rule fitted on these (validation) images: the lowest threshold at which the decided images
    reach `target` accuracy. When no threshold does (not even the most confident image is right often enough),
    the threshold is just above every confidence: everything is referred, and `reachable` says so."""
    curve = risk_coverage(conf, correct)
    coverage, threshold = curve.coverage_at_accuracy(target)
    reachable = threshold is not None
    if not reachable:
        threshold = float(np.nextafter(np.max(conf), np.inf))
    decided = np.asarray(conf) >= threshold
    return {
        "threshold": threshold,
        "target_accuracy": target,
        "reachable": reachable,
        "n": int(len(conf)),
        "coverage": round(coverage, 4),
        "accuracy": round(float(np.asarray(correct)[decided].mean()), 4) if decided.any() else None,
        "aurc": round(curve.aurc, 4),
    }


def decisions(proba: np.ndarray, threshold: float | None) -> np.ndarray:
    """DECIDED or REFER per image; every image is decided when there is no threshold."""
    if threshold is None:
        return np.full(len(proba), DECIDED, dtype=object)
    return np.where(confidence(proba) >= threshold, DECIDED, REFER).astype(object)


def weighted_at_threshold(weights: np.ndarray, conf: np.ndarray, correct: np.ndarray, threshold: float):
    """(coverage, accuracy of the decided) per weight row (B,): the lesion bootstrap of both figures. A row with
    no decided image has NaN accuracy."""
    decided = (np.asarray(conf) >= threshold).astype(weights.dtype)
    hits = decided * np.asarray(correct, dtype=weights.dtype)
    total, kept, right = weights.sum(axis=1), weights @ decided, weights @ hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return kept / total, right / kept


def draw(path, curve: Curve, title: str, point: dict | None = None, target: float | None = None) -> None:
    """PNG: risk against coverage, with the AURC, the target accuracy's risk and the stored threshold's test point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    ax.step(curve.coverage, curve.risk, where="post", label=f"test risk-coverage (AURC {curve.aurc:.4f})")
    if target is not None:
        ax.axhline(1 - target, color="grey", linestyle="--", linewidth=1, label=f"risk at the target accuracy {target}")
    if point and point.get("coverage") is not None and point.get("accuracy") is not None:
        label = f"threshold {point['threshold']:.3f} (chosen on validation): coverage {point['coverage']:.3f}"
        ax.plot([point["coverage"]], [1 - point["accuracy"]], "o", color="crimson", label=label)
    ax.set_xlabel("coverage (share of images decided, most confident first)")
    ax.set_ylabel("risk (error rate of the decided images)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.05, float(curve.risk.max()) * 1.1))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
