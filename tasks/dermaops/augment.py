"""Batch-wise augmentation for dermatoscopy, on tensors already in memory (on the GPU when there is one).

Dermatoscopic images have no canonical orientation, so every flip and 90-degree rotation is a valid
image of the same lesion; small free rotations with a little zoom mimic how the dermatoscope is
held; colour jitter covers differences between cameras, lighting and skin tones. Everything runs on
a whole batch of float images in [0, 1] (N, 3, H, W), each sample drawing its own parameters from
`generator`, so no per-image Python loop and no JPEG decoding sits in the epoch loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentConfig:
    max_rotation_deg: float = 20.0
    max_zoom: float = 0.10
    max_shift: float = 0.05  # crop jitter: the frame moves by up to this share of its width / height
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03  # fraction of a full turn of the hue circle


def _uniform(n: int, low: float, high: float, like, generator):
    import torch

    return torch.rand(n, generator=generator, device=like.device, dtype=like.dtype) * (high - low) + low


def geometric(x, cfg: AugmentConfig, generator):
    """One resampling per batch: a random element of the frame's symmetry group (flips and turns that keep
    its shape: quarter turns for a square, half turns for a 4:3 frame; exact on the pixel grid) composed
    with a small free rotation, zoom and shift (scale and crop jitter); reflection padding so no black
    corners appear.

    The rotation is one of PIXELS: affine_grid works in coordinates normalised to [-1, 1] on each axis, so
    on a height x width frame the rotation matrix is conjugated by the aspect ratio (r = height / width),
    or a turn would also stretch the lesion by 4:3."""
    import torch
    import torch.nn.functional as F

    n, height, width = x.shape[0], x.shape[2], x.shape[3]
    quarter = 1 if height == width else 2  # the smallest turn that keeps the frame's shape
    turns = torch.randint(0, 4 // quarter, (n,), generator=generator, device=x.device).to(x.dtype)
    mirror = torch.randint(0, 2, (n,), generator=generator, device=x.device).to(x.dtype) * 2 - 1
    angle = turns * (quarter * math.pi / 2)
    angle = angle + _uniform(n, -cfg.max_rotation_deg, cfg.max_rotation_deg, x, generator) * (math.pi / 180.0)
    scale = _uniform(n, 1.0 - cfg.max_zoom, 1.0 + cfg.max_zoom, x, generator)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    r = height / width
    # Normalised coordinates span 2 per side: a shift of s of the side is 2 s.
    dx = _uniform(n, -cfg.max_shift, cfg.max_shift, x, generator) * 2
    dy = _uniform(n, -cfg.max_shift, cfg.max_shift, x, generator) * 2
    theta = torch.stack([torch.stack([cos * mirror, -sin * r, dx], 1), torch.stack([sin * mirror / r, cos, dy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# RGB -> luma weights (ITU-R 601), as torchvision's colour jitter uses.
LUMA = (0.299, 0.587, 0.114)
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def colour_jitter(x, cfg: AugmentConfig, generator):
    """Brightness, contrast, saturation and hue with per-sample factors.

    All four are linear in RGB, so they compose into one 3x3 matrix plus an offset per sample and
    cost a single pass over the pixels: brightness b*I; saturation s*I + (1-s)*1*luma^T; hue a
    rotation of the chroma plane in YIQ space; contrast pulls every pixel towards the image's mean
    grey level with factor c (offset (1-c)*mean grey after the other three).
    """
    import torch

    n, dev, dt = x.shape[0], x.device, x.dtype
    eye = torch.eye(3, device=dev, dtype=dt).expand(n, 3, 3)
    luma = torch.tensor(LUMA, device=dev, dtype=dt)
    grey = torch.ones(3, 1, device=dev, dtype=dt) @ luma.view(1, 3)
    b = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, x, generator).view(n, 1, 1)
    s = _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, x, generator).view(n, 1, 1)
    c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, x, generator).view(n, 1)
    phi = _uniform(n, -cfg.hue, cfg.hue, x, generator) * (2 * math.pi)
    to_yiq = torch.tensor(RGB_TO_YIQ, device=dev, dtype=dt)
    rot = torch.zeros(n, 3, 3, device=dev, dtype=dt)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(phi), -torch.sin(phi)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(phi), torch.cos(phi)
    hue = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    colour = hue @ (s * eye + (1 - s) * grey) @ (b * eye)
    mean_grey = (colour @ x.mean(dim=(2, 3)).unsqueeze(2)).squeeze(2) @ luma
    matrix = c.view(n, 1, 1) * colour
    offset = ((1 - c) * mean_grey.view(n, 1)).expand(n, 3)
    out = torch.baddbmm(offset.unsqueeze(2), matrix, x.flatten(2))
    return out.view_as(x).clamp_(0.0, 1.0)


def augment_batch(x, generator, cfg: AugmentConfig = AugmentConfig()):
    """Float images in [0, 1], (N, 3, H, W) -> augmented images, same shape and device."""
    return colour_jitter(geometric(x, cfg, generator), cfg, generator)


class PolicyAugment:
    """An augmentation policy of torchvision's v2 transforms applied to each image of a uint8 batch, on the
    batch's device: TrivialAugmentWide (Mueller & Hutter, 2021) or RandAugment (Cubuk et al., 2020).

    Per image, because a policy's point is that every image gets its own op and strength (v2 applies one
    draw to a whole batched tensor). On the device, not in the loader's workers: on a GPU host a worker
    would spend milliseconds of CPU per image (more than the GPU's step for it), while on the GPU each op
    is a few kernel launches. The ops draw their parameters from torch's CPU generator; the draw is seeded
    per batch (`seed`) inside `fork_rng`, so a resumed epoch augments exactly alike and nothing else's
    randomness moves."""

    def __init__(self, policy: str):
        from torchvision.transforms import v2

        policies = {"trivial": v2.TrivialAugmentWide, "randaugment": lambda: v2.RandAugment(2, 9)}
        if policy not in policies:
            raise ValueError(f"unknown augmentation policy {policy!r} (allowed: {', '.join(policies)})")
        self.policy = policy
        self.transform = policies[policy]()

    def __call__(self, images_uint8_nhwc, seed: int):
        """uint8 (N, H, W, 3) -> the same shape and device, each image through the policy."""
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            chw = images_uint8_nhwc.permute(0, 3, 1, 2)
            out = torch.stack([self.transform(image) for image in chw])
        return out.permute(0, 2, 3, 1)


def mix_batch(x, mixup_alpha: float, cutmix_alpha: float, rng):
    """MixUp (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a batch with itself rolled by one, as
    torchvision's reference recipes do it (the batch is already shuffled, so the roll pairs random images).

    One lambda ~ Beta(alpha, alpha) per batch; with both alphas above 0 each batch picks one of the two at
    random. CutMix's lambda is the share of the image left unpasted, after clipping the box to the image.
    Returns (mixed images, lambda): the loss is lambda * loss(y) + (1 - lambda) * loss(y rolled by one).
    `rng` is a numpy Generator (torch has no seeded Beta draw), seeded per epoch so a resumed run mixes alike.
    """
    methods = [m for m, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not methods or x.shape[0] < 2:
        return x, 1.0
    method = methods[int(rng.integers(len(methods)))]
    other = x.roll(1, 0)
    if method == "mixup":
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        return x * lam + other * (1.0 - lam), lam
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    h, w = x.shape[-2:]
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    half_h, half_w = int(h * math.sqrt(1.0 - lam)) // 2, int(w * math.sqrt(1.0 - lam)) // 2
    y0, y1, x0, x1 = max(cy - half_h, 0), min(cy + half_h, h), max(cx - half_w, 0), min(cx + half_w, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
