"""Grad-CAM (Selvaraju et al., 2017) over a model's last convolutional block, and its PNG grid.

For a target class c, the block's activations A_k (k = channels) are weighted by the spatial mean of
d score_c / d A_k, summed, passed through ReLU and scaled to [0, 1]: where the block's features push
the class score up. Gradients are the real ones, captured with hooks during one backward pass; the
map (4x4 for a 28 px input with the small stem) is upsampled bilinearly to the image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Overlays are drawn at least this big so 28 px images stay readable.
DISPLAY_MIN_PX = 112


@dataclass
class GradCam:
    heatmaps: np.ndarray  # (N, H, W) float in [0, 1], upsampled to the image size
    raw: np.ndarray  # (N, h, w) the ReLU'd map at the block's resolution, before scaling
    gradient_norms: np.ndarray  # (N,) L2 norm of d score / d activations: 0 would mean no signal
    target_proba: np.ndarray  # (N,) softmax probability of the target class


def gradcam(model, layer, images_uint8_nhwc: np.ndarray, meta: dict, target: int, device: str = "cpu") -> GradCam:
    """Grad-CAM maps of `target` for each image, through `layer` (e.g. models.target_layer(model))."""
    import torch
    import torch.nn.functional as F

    from dermaops.models import to_input

    captured: dict[str, torch.Tensor] = {}

    def keep_activation(_module, _inputs, output):
        captured["activation"] = output
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))

    model = model.to(device).eval()
    handle = layer.register_forward_hook(keep_activation)
    try:
        x = to_input(torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).to(device), meta)
        # The input needs a gradient so that the graph reaches the block even when its weights are frozen.
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            model.zero_grad(set_to_none=True)
            # Images are independent in eval mode, so one backward of the summed scores gives each
            # image's own gradient.
            logits[:, target].sum().backward()
    finally:
        handle.remove()
    activation = captured["activation"].detach()
    gradient = captured["gradient"].detach()
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
        gradient_norms=gradient.flatten(1).norm(dim=1).cpu().numpy(),
        target_proba=torch.softmax(logits.detach().float(), dim=1)[:, target].cpu().numpy(),
    )


def pick_spread(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` items evenly spread over the ranking by score (highest first): the grid shows
    confident hits as well as misses instead of only the easiest cases."""
    order = np.argsort(-scores, kind="stable")
    if len(order) <= count:
        return order
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)]


def draw_grid(path, images_uint8_nhwc, heatmaps, titles: list[str], columns: int = 4) -> None:
    """PNG: each image next to its heatmap overlay (jet, semi-transparent), `columns` pairs per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(images_uint8_nhwc)
    rows = max(1, -(-n // columns))
    side = max(DISPLAY_MIN_PX, images_uint8_nhwc.shape[1])
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        image = np.asarray(Image.fromarray(images_uint8_nhwc[i]).resize((side, side), Image.Resampling.BICUBIC))
        heat = np.asarray(Image.fromarray((heatmaps[i] * 255).astype(np.uint8)).resize((side, side)))
        left, right = axes[i // columns, 2 * (i % columns)], axes[i // columns, 2 * (i % columns) + 1]
        left.imshow(image)
        left.set_title(titles[i], fontsize=6)
        right.imshow(image)
        right.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=255)
        right.set_title("Grad-CAM", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
