"""Grad-CAM (Selvaraju et al., 2017) over a convolutional layer chosen for resolution, how well it
localizes the lesion, and its PNG grid.

For a target class c, the layer's activations A_k (k = channels) are weighted by the spatial mean of
d score_c / d A_k, summed, passed through ReLU and scaled to [0, 1]: where the layer's features push
the class score up. Gradients are the real ones, captured with hooks during one backward pass; the
map is upsampled bilinearly to the image size.

Which layer. The last block of a ResNet sees 1/32 of the input: 2x2 at 48 px, which can only say
"this quarter of the image". `pick_target_layer` probes the model with one dummy forward pass at its
trained size and takes the deepest convolutional module (a conv, or a block or stage made of them)
whose output is still at least MIN_MAP x MIN_MAP: deep enough to carry class evidence, fine enough to
point at the lesion. No layer name is assumed.

How well it localizes, against the lesion masks (the HAM10000 segmentations, Tschandl et al. 2020,
brought to the model's frame through the image's own box; `imagecache.load_masks`). Two figures:

- the energy ratio: the share of the map's mass inside the mask divided by the mask's share of the
  image (1 = no better than spreading the mass evenly; above 1 the map concentrates on the lesion;
  its ceiling is 1 / the mask's share);
- the pointing game (Zhang et al., 2016): a hit when the map's maximum falls inside the mask dilated
  by POINTING_TOLERANCE of the frame's width (2.5 %: 15 px of a 600 px original, the game's tolerance),
  so a peak on the lesion's rim counts. A map with no mass points nowhere: a miss.

Sources without masks fall back to an Otsu threshold of the grey image (lesions are darker than the
skin around them in 95 % of the HAM10000 images), and the report says which masks were used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dermaops.checkpoint import CheckpointMeta

# Overlays are drawn at least this big so 28 px images stay readable.
DISPLAY_MIN_PX = 112
# The coarsest map a target layer may give (the bar: a 2x2 map cannot localize a lesion).
MIN_MAP = 6
# The pointing game's tolerance, as a share of the frame's width (see the module docstring).
POINTING_TOLERANCE = 0.025


@dataclass
class GradCam:
    heatmaps: np.ndarray  # (N, H, W) float in [0, 1], upsampled to the image size
    raw: np.ndarray  # (N, h, w) the ReLU'd map at the layer's resolution, before scaling
    mass: np.ndarray  # (N, H, W) the ReLU'd map upsampled, unscaled: where the evidence is, and how much
    gradient_norms: np.ndarray  # (N,) L2 norm of d score / d activations: 0 would mean no signal
    target_proba: np.ndarray  # (N,) softmax probability of the target class


def pick_target_layer(model, meta: CheckpointMeta, min_map: int = MIN_MAP):
    """(module, name, (h, w)): the deepest convolutional module whose output at the model's input size is
    at least `min_map` on both sides; the finest one there is when none reaches it. "Deepest" is the
    order in which modules finish their forward pass, seen with hooks on one dummy image; a module
    counts when it is a Conv2d or contains one (a residual block or stage: its output is the block's)."""
    import torch

    height, width = meta.frame.shape
    finished: list[tuple[str, torch.nn.Module, tuple[int, int]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or not any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
            continue

        def record(mod, _inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                finished.append((name, mod, (int(output.shape[2]), int(output.shape[3]))))

        handles.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not finished:
        raise ValueError("the model has no convolutional layer to compute Grad-CAM on")
    fine = [entry for entry in finished if min(entry[2]) >= min_map]
    name, module, shape = fine[-1] if fine else max(finished, key=lambda entry: min(entry[2]))
    return module, name, shape


def gradcam(
    model,
    layer,
    images_uint8_nhwc: np.ndarray,
    meta: CheckpointMeta,
    target: int,
    device: str = "cpu",
    batch_size: int = 256,
) -> GradCam:
    """Grad-CAM maps of `target` for each image, through `layer` (e.g. pick_target_layer(model, meta)[0])."""
    parts = [
        _gradcam_batch(model, layer, images_uint8_nhwc[start : start + batch_size], meta, target, device)
        for start in range(0, len(images_uint8_nhwc), batch_size)
    ]
    return GradCam(*(np.concatenate([getattr(p, f) for p in parts]) for f in GradCam.__dataclass_fields__))


def _gradcam_batch(
    model, layer, images_uint8_nhwc: np.ndarray, meta: CheckpointMeta, target: int, device: str
) -> GradCam:
    import torch
    import torch.nn.functional as F

    from dermaops.models import to_input

    captured: dict[str, torch.Tensor] = {}

    def start_graph_here(_module, _inputs, output):
        # The layer's output, cut from what came before, becomes the leaf the gradient is taken for: the
        # backward pass runs through the later layers only, and no weight gradient is computed.
        output = output.detach().requires_grad_(True)
        captured["activation"] = output
        return output

    model = model.to(device).eval()
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    handle = layer.register_forward_hook(start_graph_here)
    try:
        for p in params:
            p.requires_grad_(False)
        x = to_input(torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).to(device), meta)
        with torch.enable_grad():
            logits = model(x)
            # Images are independent in eval mode, so the gradient of the summed scores gives each
            # image's own gradient.
            (gradient,) = torch.autograd.grad(logits[:, target].sum(), captured["activation"])
    finally:
        handle.remove()
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
    activation = captured["activation"].detach()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    raw = F.relu((weights * activation).sum(dim=1, keepdim=True))
    size = images_uint8_nhwc.shape[1:3]
    up = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)[:, 0]
    low = up.flatten(1).min(dim=1).values.view(-1, 1, 1)
    high = up.flatten(1).max(dim=1).values.view(-1, 1, 1)
    heatmaps = (up - low) / (high - low).clamp_min(1e-12)
    return GradCam(
        heatmaps=heatmaps.cpu().numpy(),
        raw=raw[:, 0].cpu().numpy(),
        mass=up.cpu().numpy(),
        gradient_norms=gradient.flatten(1).norm(dim=1).cpu().numpy(),
        target_proba=torch.softmax(logits.detach().float(), dim=1)[:, target].cpu().numpy(),
    )


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 255]: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0, 256))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros(bins), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros(bins), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def lesion_mask(image_uint8_hwc: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels darker than the Otsu threshold of the grey image (lesions are darker than
    the surrounding skin in dermoscopy)."""
    grey = image_uint8_hwc.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return grey < otsu_threshold(grey)


def otsu_masks(images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: the Otsu lesion mask of each image (the fallback for sources without masks)."""
    return (
        np.stack([lesion_mask(image) for image in images_uint8_nhwc])
        if len(images_uint8_nhwc)
        else np.zeros((0, *images_uint8_nhwc.shape[1:3]), dtype=bool)
    )


def energy_ratios(mass: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) per image: share of the map's mass inside the lesion mask / the mask's share of the image.
    NaN where it is undefined (a map with no mass, a mask that is empty or the whole image)."""
    out = np.full(len(mass), np.nan)
    for i, (m, mask) in enumerate(zip(mass, masks, strict=True)):
        total, area = float(m.sum()), float(mask.mean())
        if total > 0 and 0 < area < 1:
            out[i] = float(m[mask].sum()) / total / area
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """A bool mask grown by `radius` pixels (a square structuring element: shifts of the mask OR-ed)."""
    if radius <= 0:
        return mask
    padded = np.pad(mask, radius)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def pointing_hits(mass: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) bool per image: the map's maximum lies inside the lesion mask dilated by the game's tolerance.
    A map without mass has no maximum to point with: a miss. NaN-free; images with an empty mask are
    reported by the caller (`pointing_defined`)."""
    radius = round(POINTING_TOLERANCE * masks.shape[2]) if masks.ndim == 3 else 0
    hits = np.zeros(len(mass), dtype=bool)
    for i, (m, mask) in enumerate(zip(mass, masks, strict=True)):
        if float(m.max(initial=0.0)) <= 0:
            continue
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        hits[i] = bool(dilate(mask, radius)[y, x])
    return hits


@dataclass
class Localization:
    """How well maps point at the lesions: per image, and summarised per group (class)."""

    energy: np.ndarray  # (N,) energy ratio, NaN where undefined
    hits: np.ndarray  # (N,) bool pointing-game hit
    scored: np.ndarray  # (N,) bool: the image has a non-empty mask (the game is played on these)

    @classmethod
    def of(cls, mass: np.ndarray, masks: np.ndarray) -> Localization:
        return cls(energy_ratios(mass, masks), pointing_hits(mass, masks), masks.reshape(len(masks), -1).any(axis=1))

    def summary(self, rows: np.ndarray | None = None) -> dict:
        """n, the mean and median energy ratio and the pointing-game hit rate over `rows` (default: all)."""
        rows = np.arange(len(self.energy)) if rows is None else rows
        energy = self.energy[rows]
        energy = energy[np.isfinite(energy)]
        scored = rows[self.scored[rows]]
        return {
            "n": int(len(rows)),
            "energy_ratio": round(float(energy.mean()), 4) if len(energy) else None,
            "energy_ratio_median": round(float(np.median(energy)), 4) if len(energy) else None,
            "energy_images": int(len(energy)),
            "pointing_hit_rate": round(float(self.hits[scored].mean()), 4) if len(scored) else None,
            "pointing_images": int(len(scored)),
        }


def pick_spread(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` items evenly spread over the ranking by score (highest first): the grid shows
    confident hits as well as misses instead of only the easiest cases."""
    order = np.argsort(-scores, kind="stable")
    if len(order) <= count:
        return order
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)]


def draw_grid(path, images_uint8_nhwc, heatmaps, titles: list[str], columns: int = 4, masks=None) -> None:
    """PNG: each image next to its heatmap overlay (jet, semi-transparent), `columns` pairs per row; with
    `masks` ((N, H, W) bool), the lesion's outline in white on both, and the map's maximum as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(images_uint8_nhwc)
    rows = max(1, -(-n // columns))
    height, width = images_uint8_nhwc.shape[1:3]
    scale = max(1.0, DISPLAY_MIN_PX / min(height, width))  # small inputs are drawn bigger, shape kept
    shown = (round(width * scale), round(height * scale))
    aspect = height / width
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.6, rows * (0.5 + 1.6 * aspect)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        image = np.asarray(Image.fromarray(images_uint8_nhwc[i]).resize(shown, Image.Resampling.BICUBIC))
        heat = np.asarray(Image.fromarray((heatmaps[i] * 255).astype(np.uint8)).resize(shown))
        left, right = axes[i // columns, 2 * (i % columns)], axes[i // columns, 2 * (i % columns) + 1]
        left.imshow(image)
        left.set_title(titles[i], fontsize=6)
        right.imshow(image)
        right.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=255)
        right.set_title("Grad-CAM", fontsize=6)
        if masks is not None and masks[i].any():
            outline = np.asarray(Image.fromarray(masks[i].astype(np.uint8) * 255).resize(shown)) >= 128
            for ax in (left, right):
                ax.contour(outline, levels=[0.5], colors="white", linewidths=0.8)
            y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
            right.plot([x], [y], marker="+", color="white", markersize=6, markeredgewidth=1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
