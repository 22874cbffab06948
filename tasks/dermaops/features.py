"""Hand-made image features for the Random Forest baseline (numpy only: the baseline runs in the light
image, without torch).

Per image, from uint8 RGB pixels:
- colour histograms: HIST_BINS bins per R, G, B channel, as fractions of the pixels;
- HSV statistics: circular mean of hue (cos, sin) and its concentration, weighted by saturation
  (grey pixels have no meaningful hue); mean, std and the 10/50/90th percentiles of S and V;
- downsampled pixels: the image area-averaged to GRID x GRID x 3, scaled to [0, 1].

train_baseline and evaluate both call `image_features`, so the features a model was fitted on and
the ones it is scored on cannot drift apart. FEATURE_VERSION goes into fingerprints: change it
whenever the features change.
"""

from __future__ import annotations

import numpy as np

FEATURE_VERSION = 1
HIST_BINS = 16
GRID = 8
PERCENTILES = (10, 50, 90)
# Bounded memory at large image sizes: features are computed this many images at a time.
CHUNK = 512


def feature_names() -> list[str]:
    names = [f"hist_{c}_{b}" for c in "rgb" for b in range(HIST_BINS)]
    names += ["hue_cos", "hue_sin", "hue_concentration"]
    for channel in ("sat", "val"):
        names += [f"{channel}_mean", f"{channel}_std"] + [f"{channel}_p{p}" for p in PERCENTILES]
    names += [f"px_{y}_{x}_{c}" for y in range(GRID) for x in range(GRID) for c in "rgb"]
    return names


def image_features(images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, len(feature_names())) float32."""
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if min(images.shape[1:3]) < GRID:
        raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} px are smaller than the {GRID}x{GRID} grid")
    parts = [_chunk_features(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)]
    if not parts:
        return np.zeros((0, len(feature_names())), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)


def _chunk_features(images: np.ndarray) -> np.ndarray:
    n = len(images)
    pixels = images.reshape(n, -1, 3)
    rgb = pixels.astype(np.float32) / 255.0
    return np.concatenate([_histograms(pixels), _hsv_stats(rgb), _downsampled(images)], axis=1)


def _histograms(pixels: np.ndarray) -> np.ndarray:
    n, n_pixels, _ = pixels.shape
    bins = (pixels // (256 // HIST_BINS)).astype(np.int64)  # (n, p, 3) bin index per channel
    # One bincount over (image, channel, bin) instead of a Python loop per image.
    flat = (np.arange(n)[:, None, None] * 3 + np.arange(3)[None, None, :]) * HIST_BINS + bins
    counts = np.bincount(flat.ravel(), minlength=n * 3 * HIST_BINS).reshape(n, 3 * HIST_BINS)
    return counts / n_pixels


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in radians [0, 2pi), saturation and value in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    sat = np.divide(delta, value, out=np.zeros_like(value), where=value > 0)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6.0,
        np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(delta > 0, hue, 0.0) * (np.pi / 3.0)
    return hue, sat, value


def _hsv_stats(rgb: np.ndarray) -> np.ndarray:
    hue, sat, value = _rgb_to_hsv(rgb)
    weight = sat.sum(axis=1)
    safe_weight = np.where(weight > 0, weight, 1.0)
    hue_cos = (np.cos(hue) * sat).sum(axis=1) / safe_weight
    hue_sin = (np.sin(hue) * sat).sum(axis=1) / safe_weight
    columns = [hue_cos, hue_sin, np.hypot(hue_cos, hue_sin)]
    for channel in (sat, value):
        columns += [channel.mean(axis=1), channel.std(axis=1)]
        columns += list(np.percentile(channel, PERCENTILES, axis=1))
    return np.stack(columns, axis=1)


def _downsampled(images: np.ndarray) -> np.ndarray:
    """Area average over a GRID x GRID partition (uneven cells when the size is not a multiple)."""
    n, height, width, _ = images.shape
    rows = np.linspace(0, height, GRID + 1).astype(int)[:-1]
    cols = np.linspace(0, width, GRID + 1).astype(int)[:-1]
    sums = np.add.reduceat(np.add.reduceat(images.astype(np.float64), rows, axis=1), cols, axis=2)
    areas = np.outer(np.diff(np.append(rows, height)), np.diff(np.append(cols, width)))
    return (sums / areas[None, :, :, None] / 255.0).reshape(n, -1)
