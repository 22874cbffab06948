"""A checkpoint as every consumer uses it: `Predictor`, the one place inference is assembled.

evaluate (dermaops.scoring), predict (dermaops.prediction), the post-hoc fits of train (dermaops.calibration,
dermaops.guards) and the model card all go through it:

1. the model on its device, fed training's preprocessing (models.predict_proba): the softmax of the image as
   it is, or its mean over the frame's symmetry views (test-time augmentation);
2. the logit adjustment (meta `logit_bias`, fitted on validation by `train --calibrate`): softmax(log p + bias);
3. the temperature (meta `temperature`, fitted on validation after the adjustment): softmax(log p / T); for one
   view log p equals the logits up to a constant, so this is exactly softmax(logits / T);
4. the decision rule: the melanoma operating point (`OperatingPoint`), a threshold on the calibrated p(mel)
   read from champion.json first (the registry may move it without a new checkpoint), then from the
   checkpoint's meta; without one, an image is flagged when `mel` is the argmax. The referral threshold and
   the out-of-distribution detector (dermaops.guards) are defined on the output of step 3 as well.

Steps 2 and 3 can be left out (`calibrate(adjust=False / temperature=False)`): evaluate's ablations, and the
fits that learn those very steps. numpy only at import time; torch when a model is loaded or run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermaops.checkpoint import CheckpointMeta, is_probability
from dermaops.errors import StageError


def _softmax_of_log(proba: np.ndarray, shift=0.0, temperature: float = 1.0) -> np.ndarray:
    """softmax((log p + shift) / T), stably: both calibration steps are this map on probabilities."""
    logits = (np.log(np.clip(proba, 1e-12, None)) + shift) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def adjust_proba(proba: np.ndarray, logit_bias) -> np.ndarray:
    """softmax(log p + bias): the logit adjustment on probabilities (None: unchanged)."""
    if logit_bias is None:
        return proba
    return _softmax_of_log(proba, shift=np.asarray(logit_bias, dtype=np.float64))


def apply_temperature(proba: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(log p / T): temperature scaling on probabilities (the identity for T = 1 or None)."""
    if temperature is None:
        return proba
    return _softmax_of_log(proba, temperature=float(temperature))


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float | None
    source: str  # champion.json | checkpoint meta | none

    @property
    def rule(self) -> str:
        if self.threshold is None:
            return "argmax == mel (the model carries no mel_threshold)"
        return f"p(mel) >= {self.threshold:.4f} (mel_threshold from {self.source})"

    def flags(self, proba: np.ndarray, mel: int) -> np.ndarray:
        if self.threshold is None:
            return proba.argmax(axis=1) == mel
        return proba[:, mel] >= self.threshold


def operating_point(meta: CheckpointMeta | None, champion: dict | None) -> OperatingPoint:
    """The melanoma rule: champion.json's `mel_threshold` first, then the checkpoint's, else argmax."""
    candidates = (("champion.json", (champion or {}).get("mel_threshold")),
                  ("checkpoint meta", meta.mel_threshold if meta is not None else None))  # fmt: skip
    for source, value in candidates:
        if value is None:
            continue
        if not is_probability(value):
            raise StageError(f"mel_threshold in the {source} is {value!r}; it must be a number between 0 and 1")
        return OperatingPoint(float(value), source)
    return OperatingPoint(None, "none")


@dataclass
class Predictor:
    model: object  # the torch module, in eval mode
    meta: CheckpointMeta
    device: str | None = None  # None: where the model's parameters are
    point: OperatingPoint = field(default=None)  # the decision rule; default: the checkpoint's own

    def __post_init__(self) -> None:
        if self.point is None:
            self.point = operating_point(self.meta, None)

    @classmethod
    def load(
        cls, path: Path, device: str = "cpu", *, classes=None, what: str | None = None, champion: dict | None = None
    ) -> Predictor:
        """The checkpoint at `path` on `device`; StageError when it is not one of ours, or (`classes` given)
        predicts other classes. `champion`: champion.json, whose mel_threshold overrides the checkpoint's."""
        from dermaops.checkpoint import load_checkpoint

        model, meta = load_checkpoint(path, device=device)
        if classes is not None and list(meta.classes) != list(classes):
            raise StageError(f"{what or path} predicts classes {list(meta.classes)}, expected {list(classes)}")
        return cls(model, meta, device, operating_point(meta, champion))

    @property
    def frame(self):
        return self.meta.frame

    @property
    def temperature(self) -> float | None:
        return None if self.meta.temperature is None else float(self.meta.temperature)

    def softmax(self, images_uint8_nhwc: np.ndarray, *, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """Step 1: the model's softmax (the mean over the frame's symmetry views with `tta`), before adjustment
        and temperature."""
        from dermaops.models import predict_proba

        return predict_proba(self.model, images_uint8_nhwc, self.meta, batch_size, self.device, tta=tta)

    def calibrate(self, softmax: np.ndarray, *, adjust: bool = True, temperature: bool = True) -> np.ndarray:
        """Steps 2 and 3 on a softmax of this model: the one place their order is written."""
        proba = adjust_proba(softmax, self.meta.logit_bias) if adjust else softmax
        return apply_temperature(proba, self.temperature) if temperature else proba

    def predict(self, images_uint8_nhwc: np.ndarray, *, tta: bool = False, batch_size: int = 256) -> np.ndarray:
        """The probabilities every consumer reads: softmax, adjustment, temperature."""
        return self.calibrate(self.softmax(images_uint8_nhwc, tta=tta, batch_size=batch_size))

    def flags(self, proba: np.ndarray, mel: int) -> np.ndarray:
        """Step 4: the melanoma flag of calibrated probabilities at this predictor's operating point."""
        return self.point.flags(proba, mel)
