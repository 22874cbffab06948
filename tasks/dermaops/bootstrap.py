"""Bootstrap confidence intervals of test metrics, resampling LESIONS, not images.

Images of one lesion are not independent (HAM10000 has up to 6 images of a lesion, and the
lesion-grouped split keeps them together in the test split), so a resample draws lesions with
replacement and takes all their images: an image's weight in a resample is how many times its lesion
was drawn. Every metric is then computed from weighted counts, for all resamples at once (a (B, N)
weight matrix times one-hot encodings), so 1,000 resamples of 1,000 images take well under a second.

The metrics are those of `metrics.classification_metrics` with the same conventions (macro F1 over all
classes, zero when undefined; balanced accuracy over the classes present; macro AUC over the classes
with positives and negatives; ties count one half), so a resample with every weight 1 reproduces
the point estimates exactly. Intervals are percentile intervals (2.5 %, 97.5 %).

A paired bootstrap compares two models scored on the SAME test images: each resample's weights apply
to both, and the interval is that of the per-resample difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
SEED = 20_151  # fixed: the same predictions always get the same interval
LEVEL = 0.95
# The figures every report gives an interval for (keys of resample_metrics).
HEADLINE_CI = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "mel_recall")


@dataclass(frozen=True)
class Resamples:
    """Lesion-level bootstrap weights of one test set: weights[b, i] = times image i is in resample b."""

    weights: np.ndarray  # (B, N) float32
    n_groups: int

    @classmethod
    def of(cls, groups, n_resamples: int = DEFAULT_RESAMPLES, seed: int = SEED) -> Resamples:
        codes, uniques = _codes(groups)
        n_groups = len(uniques)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
        # One bincount over all resamples: resample b's draws are shifted into [b * G, (b + 1) * G).
        offsets = (np.arange(n_resamples) * n_groups)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_groups).reshape(n_resamples, -1)
        # float32 halves the memory traffic, and stays exact: every weighted count or rank sum here is an
        # integer or half-integer far below 2**24.
        return cls(counts[:, codes].astype(np.float32), n_groups)

    @property
    def n(self) -> int:
        return self.weights.shape[0]


def _codes(groups) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes, uniques


def weighted_confusion(weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(B, K, K) confusion matrices, rows true, columns predicted, of each weight row."""
    cell = np.asarray(y_true) * k + np.asarray(y_pred)
    onehot = np.zeros((len(cell), k * k), dtype=weights.dtype)
    onehot[np.arange(len(cell)), cell] = 1.0
    return (weights @ onehot).reshape(-1, k, k)


def weighted_auc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B,) one-vs-rest ROC AUC per weight row (the Mann-Whitney statistic, ties one half); NaN where a
    row has no positive or no negative weight.

    In score order, C is the running sum of negative weight; a positive whose tie group spans sorted
    positions [s, e) has C[s] negatives strictly below it and C[e] - C[s] tied with it, so it counts
    (C[s] + C[e]) / 2. Only the positives' columns are gathered."""
    scores = np.asarray(scores)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(scores)]
    negatives = order[~positive[order]]
    neg_sorted = np.zeros((weights.shape[0], len(scores) + 1), dtype=weights.dtype)
    neg_sorted[:, 1:][:, ~positive[order]] = weights[:, negatives]
    running = np.cumsum(neg_sorted, axis=1)
    pos_at = np.flatnonzero(positive[order])
    g = group[pos_at]
    credit = 0.5 * (running[:, starts[g]] + running[:, ends[g]])
    pos_w = weights[:, order[pos_at]]
    numerator = np.sum(pos_w * credit, axis=1, dtype=np.float64)
    denominator = pos_w.sum(axis=1, dtype=np.float64) * running[:, -1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def resample_metrics(
    weights: np.ndarray,
    y_true: np.ndarray,
    proba: np.ndarray,
    mel: int,
    mel_threshold: float | None = None,
    with_auc: bool = True,
) -> dict[str, np.ndarray]:
    """Each metric, (B,) over the weight rows: accuracy, balanced_accuracy, macro_f1, weighted_f1,
    macro_auc, mel_recall, and with a threshold mel_sensitivity / mel_specificity of p(mel) >= it."""
    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=np.float64)
    k = proba.shape[1]
    cm = weighted_confusion(weights, y_true, proba.argmax(axis=1), k).astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = support.sum(axis=1)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    f1_denominator = support + predicted
    f1 = np.divide(2 * tp, f1_denominator, out=np.zeros_like(tp), where=f1_denominator > 0)
    out = {
        "accuracy": tp.sum(axis=1) / total,
        "balanced_accuracy": recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1),
        "macro_f1": f1.mean(axis=1),
        "weighted_f1": (f1 * support).sum(axis=1) / total,
        "mel_recall": recall[:, mel],
    }
    if with_auc:
        aucs = np.stack([weighted_auc(weights, y_true == c, proba[:, c]) for c in range(k)], axis=1)
        defined = ~np.isnan(aucs)
        out["macro_auc"] = np.where(
            defined.any(axis=1), np.nansum(aucs, axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan
        )
    if mel_threshold is not None:
        flagged = proba[:, mel] >= mel_threshold
        is_mel = y_true == mel
        counts = weights @ np.stack([is_mel, ~is_mel, flagged & is_mel, ~flagged & ~is_mel], axis=1).astype(
            weights.dtype
        )
        mel_w, other_w, caught, cleared = counts.astype(np.float64).T
        with np.errstate(invalid="ignore", divide="ignore"):
            out["mel_sensitivity"] = caught / mel_w
            out["mel_specificity"] = cleared / other_w
    return out


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float | None, float | None]:
    """The percentile interval of the defined samples (None, None when none is defined)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return None, None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def confidence_intervals(
    resamples: Resamples, y_true, proba, mel: int, mel_threshold: float | None = None, level: float = LEVEL
) -> dict[str, dict]:
    """{metric: {"value", "low", "high"}}: the point estimate (all weights 1) and its interval."""
    point = resample_metrics(np.ones((1, len(y_true))), y_true, proba, mel, mel_threshold)
    samples = resample_metrics(resamples.weights, y_true, proba, mel, mel_threshold)
    out = {}
    for name, values in samples.items():
        low, high = interval(values, level)
        value = float(point[name][0])
        out[name] = {"value": None if np.isnan(value) else value, "low": low, "high": high}
    return out


def paired_difference(
    resamples: Resamples, y_true, proba_a, proba_b, metric: str, mel: int, level: float = LEVEL
) -> dict:
    """metric(a) - metric(b) on the same images: the point difference and its paired percentile interval."""
    with_auc = metric == "macro_auc"
    ones = np.ones((1, len(y_true)))
    point = (
        resample_metrics(ones, y_true, proba_a, mel, with_auc=with_auc)[metric][0]
        - resample_metrics(ones, y_true, proba_b, mel, with_auc=with_auc)[metric][0]
    )
    differences = (
        resample_metrics(resamples.weights, y_true, proba_a, mel, with_auc=with_auc)[metric]
        - resample_metrics(resamples.weights, y_true, proba_b, mel, with_auc=with_auc)[metric]
    )
    low, high = interval(differences, level)
    return {
        "metric": metric,
        "difference": float(point),
        "low": low,
        "high": high,
        "level": level,
        "resamples": resamples.n,
        "lesions": resamples.n_groups,
        "images": len(y_true),
    }
