"""Calibrated probabilities and the melanoma operating point, fitted on the VALIDATION split.

- Temperature scaling (Guo et al., 2017): one scalar T > 0 that minimises the negative log-likelihood of
  softmax(z / T) on the validation labels, found with L-BFGS on log T (so T stays positive). It changes
  no prediction (the argmax of z / T is the argmax of z), only how confident the probabilities are.
  The logits z are log p of the probabilities the model is scored with (test-time augmented and logit
  adjusted where those apply): for one view log p equals the logits up to a per-row constant, which
  softmax ignores, and it is what `predictor.apply_temperature` undoes at inference. One definition of
  "the model's probabilities" for fitting and applying.
- The expected calibration error (15 equal-width confidence bins, Naeini et al. 2015 / Guo et al.):
  sum over bins of |accuracy - mean confidence| weighted by the bin's share of images.
- The melanoma operating point: the highest threshold on the calibrated p(mel) whose validation
  sensitivity reaches the target (the highest keeps the most specificity for that sensitivity).

The stored facts are `temperature` and `mel_threshold` in the checkpoint's meta (dermaops.checkpoint);
the Predictor (dermaops.predictor) applies them and `model_card` reports them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
ECE_BINS = 15
# The temperatures a fit may store. A model whose validation predictions carry no information (an
# undertrained one) has its NLL optimum at T -> infinity (the uniform distribution); NLL is convex in
# 1/T, so the bound nearest the optimum is the constrained optimum, and that is what is stored.
TEMPERATURE_RANGE = (0.05, 20.0)


def as_logits(proba: np.ndarray) -> np.ndarray:
    """log p, the logits (up to a per-row constant) of probabilities; what temperature scaling divides."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, None))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) on `labels` (L-BFGS on log T)."""
    import torch

    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    y = torch.tensor(np.asarray(labels, dtype=np.int64))
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"logits {tuple(z.shape)} and labels {tuple(y.shape)} must be (N, C) and (N,), N > 0")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    low, high = TEMPERATURE_RANGE
    if math.isnan(temperature):
        raise ValueError("the temperature fit gave NaN: the validation logits are not finite")
    if not low <= temperature <= high:
        bound = min(max(temperature, low), high)
        log.warning("temperature fit optimum %.4g is outside %g..%g; stored at %g", temperature, low, high, bound)
        return bound
    return temperature


def scale(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(logits / T) (T None or 1: the plain softmax)."""
    z = np.asarray(logits, dtype=np.float64) / (temperature or 1.0)
    z = z - z.max(axis=1, keepdims=True)
    out = np.exp(z)
    return out / out.sum(axis=1, keepdims=True)


def nll(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, None))))


def reliability(proba: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per confidence bin (equal width over [0, 1], right-closed): count, mean confidence, accuracy; and
    the ECE those give. Empty bins have None for their means."""
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == labels).astype(np.float64)
    # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 cannot occur (max of a softmax >= 1/C).
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    filled = counts > 0
    mean_conf = np.divide(conf_sum, counts, out=np.zeros(n_bins), where=filled)
    accuracy = np.divide(acc_sum, counts, out=np.zeros(n_bins), where=filled)
    ece = float(np.sum(np.abs(accuracy - mean_conf) * counts) / max(len(labels), 1))
    return {
        "ece": ece,
        "bins": n_bins,
        "count": counts.tolist(),
        "confidence": [float(c) if f else None for c, f in zip(mean_conf, filled, strict=True)],
        "accuracy": [float(a) if f else None for a, f in zip(accuracy, filled, strict=True)],
    }


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    return reliability(proba, labels, n_bins)["ece"]


def threshold_for_sensitivity(p_mel: np.ndarray, is_mel: np.ndarray, target: float) -> float:
    """The highest threshold t such that flagging p(mel) >= t finds at least `target` of the melanomas.
    It is the k-th highest melanoma score, k = ceil(target * melanomas): every higher t misses one more."""
    scores = np.sort(np.asarray(p_mel, dtype=np.float64)[np.asarray(is_mel, dtype=bool)])[::-1]
    if len(scores) == 0:
        raise ValueError("no melanoma among the images: no threshold reaches a sensitivity")
    k = max(1, math.ceil(target * len(scores) - 1e-9))
    return float(scores[min(k, len(scores)) - 1])


def sensitivity_specificity(p_mel: np.ndarray, is_mel: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = np.asarray(p_mel) >= threshold
    is_mel = np.asarray(is_mel, dtype=bool)
    sensitivity = float(flagged[is_mel].mean()) if is_mel.any() else float("nan")
    specificity = float((~flagged[~is_mel]).mean()) if (~is_mel).any() else float("nan")
    return sensitivity, specificity


def fit(proba_val: np.ndarray, labels_val: np.ndarray, mel: int, mel_sensitivity: float) -> dict:
    """Temperature and melanoma threshold of a model from its validation probabilities: the checkpoint
    meta entries (`temperature`, `mel_threshold`) and what the fit did (`calibration`)."""
    labels_val = np.asarray(labels_val)
    logits = as_logits(proba_val)
    temperature = fit_temperature(logits, labels_val)
    before, after = scale(logits, None), scale(logits, temperature)
    is_mel = labels_val == mel
    threshold = threshold_for_sensitivity(after[:, mel], is_mel, mel_sensitivity)
    sensitivity, specificity = sensitivity_specificity(after[:, mel], is_mel, threshold)
    return {
        "temperature": temperature,
        "mel_threshold": threshold,
        "calibration": {
            "fitted_on": "val",
            "n_val": int(len(labels_val)),
            "val_nll_before": round(nll(before, labels_val), 4),
            "val_nll_after": round(nll(after, labels_val), 4),
            "val_ece_before": round(expected_calibration_error(before, labels_val), 4),
            "val_ece_after": round(expected_calibration_error(after, labels_val), 4),
            "mel_target_sensitivity": mel_sensitivity,
            "val_mel_sensitivity": round(sensitivity, 4),
            "val_mel_specificity": round(specificity, 4),
        },
    }


def draw_reliability(path: Path, before: dict, after: dict | None, title: str) -> None:
    """PNG: accuracy against mean confidence per bin, before and after temperature scaling, with the
    diagonal (perfect calibration) and each bin's share of images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_bins = before["bins"]
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    curves = [(before, "before" if after else "uncalibrated (no temperature stored)", "o")]
    if after:
        curves.append((after, "after temperature scaling", "s"))
    for stats, label, marker in curves:
        points = [(c, a) for c, a in zip(stats["confidence"], stats["accuracy"], strict=True) if c is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            top.plot(xs, ys, marker=marker, markersize=4, label=f"{label} (ECE {stats['ece']:.3f})")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    width = 1 / n_bins / len(curves)
    total = max(sum(before["count"]), 1)
    for i, (stats, label, _) in enumerate(curves):
        offset = (i - (len(curves) - 1) / 2) * width
        bottom.bar(centers + offset, np.array(stats["count"]) / total, width=width, label=label.split(" (")[0])
    bottom.set_xlabel(f"confidence (max probability), {n_bins} bins")
    bottom.set_ylabel("share")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibrate_checkpoint(
    path: Path,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    mel_sensitivity: float,
    tta: bool,
    device: str,
    val_raw: np.ndarray | None = None,
) -> dict:
    """Fit temperature and melanoma threshold of the checkpoint at `path` on its validation probabilities,
    scored as evaluate and predict score it (the logit adjustment applied when it has one; `tta` as they
    will use it), and rewrite the checkpoint with them in its meta. Returns what the fit did. The
    probabilities are the uncalibrated ones whatever the meta already holds, so a refit after a resume
    gives the same result. `val_raw`: the checkpoint's unadjusted validation probabilities (`tta` as given)
    when the caller has them, instead of scoring `val_images` again."""
    from dermaops.checkpoint import save_checkpoint
    from dermaops.dataset import CLASSES
    from dermaops.predictor import Predictor

    predictor = Predictor.load(path, device)
    if val_raw is None:
        val_raw = predictor.softmax(val_images, tta=tta)
    # The temperature is fitted on the adjusted probabilities (the order the Predictor applies them in).
    adjusted = predictor.calibrate(val_raw, temperature=False)
    fitted = fit(adjusted, val_labels, list(CLASSES).index("mel"), mel_sensitivity)
    fitted["calibration"]["tta"] = tta
    save_checkpoint(path, predictor.model, predictor.meta.replace(**fitted))
    return fitted


# -- the logit adjustment: the first post-hoc step train fits on validation, before the temperature --
# Candidate strengths of the logit adjustment; 0 (no adjustment) is among them, so the fit never
# makes the validation macro F1 worse.
ADJUSTMENT_TAUS = np.round(np.arange(-0.5, 1.5001, 0.05), 2)


def fit_logit_adjustment(proba_val: np.ndarray, y_val: np.ndarray, train_labels: np.ndarray, classes: list[str]):
    """Post-hoc logit adjustment (Menon et al., 2021) fitted on the VALIDATION split: bias = -tau * log(prior)
    with the prior from the training labels and the one scalar tau that maximises val macro F1 (ties go to the
    smallest |tau|). One parameter instead of one per class, because the rare classes have only a few
    dozen validation images (df, vasc) and a per-class bias would fit their noise."""
    from dermaops.training import log_prior, metrics  # the loss's prior and the per-epoch metrics, lazily

    prior = log_prior(train_labels, len(classes))
    log_p = np.log(np.clip(proba_val, 1e-12, None))

    def score(tau: float) -> dict:
        return metrics(y_val, (log_p - tau * prior).argmax(axis=1), classes)

    best = max(ADJUSTMENT_TAUS, key=lambda tau: (round(score(tau)["macro_f1"], 6), -abs(tau)))
    before, after = score(0.0), score(best)
    return {
        "logit_bias": [float(b) for b in -best * prior],
        "logit_adjustment": {
            "tau": float(best) + 0.0,  # never -0.0
            "fitted_on": "val",
            "val_macro_f1_before": round(before["macro_f1"], 4),
            "val_macro_f1_after": round(after["macro_f1"], 4),
            "val_acc_before": round(before["acc"], 4),
            "val_acc_after": round(after["acc"], 4),
        },
    }
