"""Inputs unlike the training data: a Mahalanobis distance in the model's own feature space.

Lee et al. (2018), "A simple unified framework for detecting out-of-distribution samples": the
penultimate-layer features (the input of the classifier's final Linear, dermaops.feature_drift.embeddings)
of the TRAINING images are modelled as Gaussians with one mean per class and one shared covariance. An
image's score is its squared Mahalanobis distance to the nearest class mean; far from every class means
unlike anything the model was trained on.

- The shared covariance is the Ledoit-Wolf shrinkage estimate of the class-centred features
  (scikit-learn): with 512 to 2048 features and a few thousand images the plain estimate is
  ill-conditioned, and its inverse would let noise directions dominate the distance.
- The threshold is chosen on VALIDATION (in-distribution images the model never trained on): the score
  below which `tpr` (0.95) of them fall, so about 5 % of genuine dermatoscopy is flagged by design.
- Stored in the checkpoint's meta by train (dermaops.guards): the class means and the precision matrix
  (the inverse covariance) as plain lists, the threshold and what the fit saw.

Also here: the corruptions the detector is tested against (blurred, overexposed, turned a quarter with a
black border), applied to a JPEG's picture as it arrives, before the model's framing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

DEFAULT_TPR = 0.95
CORRUPTIONS = ("blurred", "overexposed", "rotated_black_border")
# Blur radius as a share of the picture's longer side: at 600 px a radius of 18 px, a badly defocused lens.
BLUR_SHARE = 0.03
# Overexposure: every channel times this, clipped at white (the lesion and the skin wash out).
OVEREXPOSURE_GAIN = 2.5
# What each corruption does, in words (the reports).
CORRUPTION_TEXT = {
    "blurred": f"Gaussian blur, radius {BLUR_SHARE:.0%} of the longer side",
    "overexposed": f"every channel x {OVEREXPOSURE_GAIN}, clipped",
    "rotated_black_border": "turned 90 degrees and fitted whole into the frame, black bars beside it",
}


@dataclass(frozen=True)
class Detector:
    means: np.ndarray  # (C, d) class means of the training features (classes with no training image left out)
    precision: np.ndarray  # (d, d) inverse of the shared covariance
    threshold: float | None  # flag a score above it; None before the threshold is chosen

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each feature row to the nearest class mean."""
        x = np.asarray(features, dtype=np.float64)
        # (x - m) P (x - m)^T = xPx - 2 xPm + mPm, for every class mean at once.
        xp = x @ self.precision
        xpx = np.einsum("nd,nd->n", xp, x)
        mp = self.means @ self.precision
        mpm = np.einsum("cd,cd->c", mp, self.means)
        return np.maximum(xpx[:, None] - 2 * xp @ self.means.T + mpm[None, :], 0.0).min(axis=1)

    def flags(self, features: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ValueError("the detector has no threshold yet")
        return self.scores(features) > self.threshold


def fit(features: np.ndarray, labels: np.ndarray) -> Detector:
    """Class means and the Ledoit-Wolf shared covariance of training features (threshold not chosen yet)."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels) or len(x) < 2:
        raise ValueError(f"features {x.shape} and labels {labels.shape} must be (N, d) and (N,), N >= 2")
    present = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in present])
    centred = x - means[np.searchsorted(present, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    return Detector(means, np.linalg.inv(covariance), None)


def threshold_for_tpr(scores: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """The score at or below which `tpr` of these in-distribution images fall (an observed score)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("no validation scores to choose the threshold on")
    return float(np.quantile(scores, tpr, method="higher"))


def corrupt(data: bytes, kind: str, name: str = "an image") -> bytes:
    """The JPEG `data` corrupted as `kind` (CORRUPTIONS), re-encoded as a JPEG of the same size."""
    from PIL import Image, ImageFilter

    from dermaops.imagefile import open_image

    with open_image(data, name) as img:
        picture = img.convert("RGB")
    width, height = picture.size
    if kind == "blurred":
        out = picture.filter(ImageFilter.GaussianBlur(radius=BLUR_SHARE * max(width, height)))
    elif kind == "overexposed":
        pixels = np.asarray(picture, dtype=np.float32) * OVEREXPOSURE_GAIN
        out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    elif kind == "rotated_black_border":
        # Turned a quarter and fitted whole into the original frame: black bars on both sides.
        turned = picture.transpose(Image.Transpose.ROTATE_90)
        scale = min(width / turned.width, height / turned.height)
        turned = turned.resize((max(1, round(turned.width * scale)), max(1, round(turned.height * scale))))
        out = Image.new("RGB", (width, height))
        out.paste(turned, ((width - turned.width) // 2, (height - turned.height) // 2))
    else:
        raise ValueError(f"unknown corruption {kind!r} (known: {', '.join(CORRUPTIONS)})")
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
