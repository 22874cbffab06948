"""What a checkpoint carries to guard its predictions, fitted by train after training: the one module that
fits these fields of the checkpoint's meta (dermaops.checkpoint.CheckpointMeta) and turns them into thresholds
and detectors.

- `referral`: the confidence threshold below which `predict` refers an image to a clinician instead of
  diagnosing it (dermaops.selective), chosen on the VALIDATION split for `--referral-accuracy`, with what
  the fit saw there.
- `ood`: the out-of-distribution detector (dermaops.ood): class means and the precision matrix of the
  TRAINING split's penultimate-layer features, and the threshold chosen on VALIDATION for a 95 %
  true-in-distribution rate. Plain lists: checkpoints load with `weights_only=True`, and meta travels as
  JSON (`CheckpointMeta.record()` drops the matrices for records that only describe the model).
- `train_prior`: the training split's class shares, what prediction monitoring compares a batch's
  predicted class mix with (dermaops.monitoring).

A checkpoint without them (trained before they existed) decides every image, flags none as out of
distribution, and has no prior to monitor against: every reader says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dermaops.errors import StageError

if TYPE_CHECKING:
    from dermaops.checkpoint import CheckpointMeta

REFERRAL, OOD, PRIOR = "referral", "ood", "train_prior"  # the CheckpointMeta fields, and their summary keys
FEATURE_CHUNK = 1024  # training images embedded at once: memory stays flat however large the split

log = logging.getLogger(__name__)


# -- reading ------------------------------------------------------------------------------------
def referral_threshold(meta: CheckpointMeta) -> float | None:
    """The referral threshold on the calibrated confidence, or None (every image decided)."""
    value = (meta.referral or {}).get("threshold")
    if value is None:
        return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise StageError(f"the checkpoint's meta referral threshold is {value!r}; it must be a finite number")
    return float(value)


def detector(meta: CheckpointMeta):
    """The out-of-distribution detector (dermaops.ood.Detector), or None when the checkpoint carries none."""
    from dermaops.ood import Detector

    entry = meta.ood
    if not entry:
        return None
    try:
        means = np.asarray(entry["means"], dtype=np.float64)
        precision = np.asarray(entry["precision"], dtype=np.float64)
        threshold = float(entry["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(f"the checkpoint's meta ood entry is unusable ({type(exc).__name__}: {exc})") from exc
    if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]) or not math.isfinite(threshold):
        raise StageError(
            f"the checkpoint's meta ood entry is inconsistent: means {means.shape}, precision {precision.shape}, "
            f"threshold {threshold}"
        )
    return Detector(means, precision, threshold)


def train_prior(meta: CheckpointMeta) -> np.ndarray | None:
    value = meta.train_prior
    return None if value is None else np.asarray(value, dtype=np.float64)


def summary(meta: CheckpointMeta) -> dict:
    """The guards' facts for reports and model cards (no matrices)."""
    record = meta.record()
    return {REFERRAL: record[REFERRAL], OOD: record[OOD], PRIOR: record[PRIOR]}


# -- fitting (train) ----------------------------------------------------------------------------
def features(model, images: np.ndarray, meta: CheckpointMeta, batch_size: int, device: str) -> np.ndarray:
    """Penultimate-layer features of uint8 images in the model's frame (the input of its final Linear)."""
    from dermaops.feature_drift import embeddings

    return embeddings(model, images, meta, batch_size, device)


def fit_checkpoint(
    path: Path,
    train_rows: Callable[[list], np.ndarray],
    train_ids: list,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    referral_accuracy: float,
    ood_tpr: float,
    tta: bool,
    device: str,
    batch_size: int = 256,
    val_raw: np.ndarray | None = None,
) -> dict:
    """Fit the referral threshold, the out-of-distribution detector and the training prior of the checkpoint
    at `path` (its temperature and logit adjustment already stored) and rewrite it with them. `train_rows`
    gives the uint8 images of a list of training ids (read a chunk at a time); `val_raw`, when the caller has
    them, the checkpoint's unadjusted validation probabilities (`tta` as given), instead of scoring
    `val_images` again. Returns the facts (no arrays)."""
    from dermaops import ood, selective
    from dermaops.checkpoint import save_checkpoint
    from dermaops.dataset import CLASSES
    from dermaops.models import head_name
    from dermaops.predictor import Predictor

    predictor = Predictor.load(path, device)
    model, meta = predictor.model, predictor.meta
    # The validation probabilities as predict will see them: adjusted, tempered, `tta` as evaluate scores.
    if val_raw is None:
        val_raw = predictor.softmax(val_images, tta=tta)
    proba = predictor.calibrate(val_raw)
    correct = proba.argmax(axis=1) == np.asarray(val_labels)
    referral = selective.threshold_for_accuracy(selective.confidence(proba), correct, referral_accuracy)
    referral.update(fitted_on="val", tta=tta)

    train_features = np.concatenate(
        [
            features(model, train_rows(train_ids[start : start + FEATURE_CHUNK]), meta, batch_size, device)
            for start in range(0, len(train_ids), FEATURE_CHUNK)
        ]
    )
    fitted = ood.fit(train_features, train_labels)
    val_scores = fitted.scores(features(model, val_images, meta, batch_size, device))
    threshold = ood.threshold_for_tpr(val_scores, ood_tpr)
    detector_entry = {
        "method": "mahalanobis, class-conditional means, shared Ledoit-Wolf covariance",
        "layer": f"input of {head_name(model)}",
        "dim": int(fitted.means.shape[1]),
        "threshold": threshold,
        "tpr": ood_tpr,
        "n_train": int(len(train_features)),
        "n_val": int(len(val_scores)),
        "val_flag_rate": round(float((val_scores > threshold).mean()), 4),
        "means": fitted.means.tolist(),
        "precision": fitted.precision.tolist(),
    }
    prior = np.bincount(np.asarray(train_labels), minlength=len(CLASSES)) / len(train_labels)
    guarded = meta.replace(referral=referral, ood=detector_entry, train_prior=[round(float(p), 6) for p in prior])
    save_checkpoint(path, model, guarded)
    facts = summary(guarded)
    log.info("guards fitted: referral %s; out-of-distribution %s", facts[REFERRAL], facts[OOD])
    return facts
