"""The CNN: torchvision classifiers (ResNets and the efficient families), and inference on cached uint8 images.

Shared by `train` (builds and fits), `evaluate` (predicts, Grad-CAM) and anything that scores a
checkpoint (the file and its meta: dermaops.checkpoint; the inference steps after the softmax:
dermaops.predictor). Preprocessing lives here (uint8 NHWC -> normalised float NCHW) so that training and
inference can never disagree about it.

Small inputs: the ImageNet stem (7x7 stride-2 conv + max-pool) shrinks a 28 px image to 7 px before
the first residual block, which throws away most of the lesion. Below SMALL_STEM_BELOW px the
"small" stem (3x3 stride-1 conv, no max-pool), as CIFAR and MedMNIST ResNets use, is chosen instead.
From 40 px up the ImageNet stem still leaves >= 10x10 px to layer1 and costs 16x less compute than
the small stem at the same size, which decides it on CPUs. The "compact" stem (3x3 stride-1 conv, then the
max-pool) sits between: a 28 px image reaches layer1 at 14x14, without upsampling it first, for about a
quarter of the small stem's compute. Stems are a ResNet matter: the other families keep their own.

Every architecture is seen through two facts, so training and Grad-CAM need no per-family code:
its head (`head_name`: the Linear that maps pooled features to classes, replaced by a `num_classes`
one) and its stages (`stage_names`: the backbone's resolution stages, input to output, grouped as
ResNet's layer1..layer4 are), which phase 2 unfreezes from the end (`--finetune-depth`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dermaops.config import ARCHS, RESNETS, STEMS  # the settings' choices, defined once
from dermaops.errors import StageError

SMALL_STEM_BELOW = 40
# ImageNet statistics: right for ImageNet weights and a reasonable fixed scale for training from scratch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)


def resolve_stem(stem: str, image_size: int) -> str:
    """The stem for an input whose SHORT side is `image_size` px."""
    if stem not in STEMS:
        raise StageError(f"unknown stem {stem!r} (allowed: {', '.join(STEMS)})")
    if stem == "auto":
        return "small" if image_size < SMALL_STEM_BELOW else "imagenet"
    return stem


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of `arch`; a StageError if they are not there
    (they are never downloaded: production images bake them into the torch hub cache)."""
    import torch
    from torchvision.models import get_model_weights

    if arch not in ARCHS:
        raise StageError(f"unknown arch {arch!r} (allowed: {', '.join(ARCHS)})")
    weights = get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        raise StageError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({path}); bake them into the image "
            f"or pass --pretrained <local path or s3 uri to a state_dict>"
        )
    return path


def _imagenet_state_dict(arch: str) -> dict:
    import torch

    return torch.load(imagenet_weights_path(arch), map_location="cpu", weights_only=True)


def _file_state_dict(source: str) -> dict:
    """A state_dict, or one of our checkpoints, from a local path or an s3:// URI."""
    import tempfile

    import torch

    if source.startswith("s3://"):
        from dermaops.store import ArtifactStore

        with tempfile.TemporaryDirectory(prefix="dermaops-weights-") as tmp:
            path = ArtifactStore().download(source, Path(tmp) / "weights.pt")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    else:
        path = Path(source)
        if not path.is_file():
            raise StageError(f"pretrained weights not found: {source} (expected none, imagenet, a file or s3:// URI)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and "model_state" in blob:
        blob = blob["model_state"]
    if not isinstance(blob, dict):
        raise StageError(f"pretrained weights {source} hold no state_dict (got {type(blob).__name__})")
    return blob


def _load_compatible(model, state: dict, source: str) -> None:
    """Copy every tensor whose name and shape match; the head (and a replaced stem) stay fresh."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in own if k not in usable)
    backbone = tuple(f"{name}." for group in stage_names(model) for name in group)
    if not any(k.startswith(backbone) for k in usable):
        raise StageError(f"pretrained weights {source} do not fit this architecture (no backbone tensor matches)")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s; kept fresh: %s", len(usable), source, ", ".join(skipped) or "none")


def head_name(model) -> str:
    """The dotted name of the model's final Linear layer (the classifier head)."""
    import torch

    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise StageError(f"{type(model).__name__} has no Linear classifier head")
    return linears[-1]


def stage_names(model) -> list[tuple[str, ...]]:
    """The backbone's resolution stages, input to output, each a tuple of dotted module names: ResNet's
    layer1..layer4, RegNet's trunk blocks, and for the families whose backbone is one `features` sequence
    (MobileNetV3, EfficientNet, ConvNeXt) its blocks grouped by output resolution (a dummy forward tells),
    the stem excluded."""
    import torch

    if hasattr(model, "layer4"):
        return [(f"layer{i}",) for i in range(1, 5)]
    if hasattr(model, "trunk_output"):
        return [(f"trunk_output.{name}",) for name, _ in model.trunk_output.named_children()]
    features = getattr(model, "features", None)
    if not isinstance(features, torch.nn.Sequential):
        raise StageError(f"cannot find the stages of {type(model).__name__}")
    sizes: list[int] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: sizes.append(int(out.shape[-1]))) for block in features]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[list[str]] = []
    for i, size in enumerate(sizes[1:], start=1):  # features[0] is the stem
        if groups and sizes[i - 1] == size:
            groups[-1].append(f"features.{i}")
        else:
            groups.append([f"features.{i}"])
    return [tuple(group) for group in groups]


def _replace(model, dotted: str, module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def build_model(arch: str, num_classes: int, image_size: int, pretrained: str = "none", stem: str = "auto"):
    """A torchvision classifier with a `num_classes` head; `pretrained` is none, imagenet, or a path/s3 URI;
    `image_size` is the input's short side (it picks a ResNet's stem)."""
    import torch
    import torchvision

    if arch not in ARCHS:
        raise StageError(f"unknown arch {arch!r} (allowed: {', '.join(ARCHS)})")
    resolved = resolve_stem(stem, image_size)
    if arch not in RESNETS and stem not in ("auto", "imagenet"):
        raise StageError(f"--stem {stem} applies to ResNets only ({', '.join(RESNETS)}); {arch} keeps its own stem")
    model = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
    elif pretrained and pretrained != "none":
        state = _file_state_dict(pretrained)
    if arch in RESNETS:
        if resolved in ("small", "compact"):
            model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if resolved == "small":
            model.maxpool = torch.nn.Identity()
    head = head_name(model)
    _replace(model, head, torch.nn.Linear(model.get_submodule(head).in_features, num_classes))
    # MobileNetV3 and EfficientNet set BatchNorm's momentum to 0.01, tuned for ImageNet's 600 epochs of
    # thousands of steps; a few hundred steps from scratch leave the running statistics near their start, and
    # the model in eval mode predicts one class. The usual 0.1 lets them follow short schedules.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and (module.momentum or 0.1) < 0.1:
            module.momentum = 0.1
    if pretrained and pretrained not in ("none", "imagenet"):
        _load_compatible(model, state, pretrained)
    return model


def to_float(batch_uint8_nhwc):
    """uint8 NHWC tensor -> float32 NCHW in [0, 1] (what augmentation works on)."""
    return batch_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x, mean, std, channels_last: bool = False):
    """Float NCHW in [0, 1] -> the model's input (standardised; channels_last on CUDA)."""
    import torch

    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def to_input(batch_uint8_nhwc, meta, channels_last: bool = False):
    """uint8 NHWC tensor (on any device) -> the model's input, exactly as in training minus augmentation
    (`meta`: the checkpoint's CheckpointMeta, whose normalisation it applies; dermaops.checkpoint imports this
    module, so the type is named here, not imported)."""
    return normalize(to_float(batch_uint8_nhwc), meta.mean, meta.std, channels_last)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise StageError("--device cuda requested but no CUDA device is available (use auto or cpu)")
    return requested


# The frame's symmetry group: for a square, 4 quarter turns, each with and without a mirror; for a
# rectangle (the aspect geometry), the turns that keep its shape: identity, half turn, and their mirrors
# (= the left-right and top-bottom flips). Every element is an equally valid view of a dermatoscopic
# image (training augments with all of them), so test-time augmentation averages the softmax over them.
DIHEDRAL_VIEWS = 8
RECTANGLE_VIEWS = (0, 2, 4, 6)


def symmetry_views(shape: tuple[int, int]) -> tuple[int, ...]:
    """The dihedral view indices (see `dihedral_view`) that keep a (height, width) frame's shape."""
    return tuple(range(DIHEDRAL_VIEWS)) if shape[0] == shape[1] else RECTANGLE_VIEWS


def dihedral_view(x, k: int):
    """View `k` (0..7) of NCHW images: k % 4 quarter turns, mirrored (left-right) when k >= 4; 0 = identity."""
    import torch

    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def predict_proba(
    model,
    images_uint8_nhwc: np.ndarray,
    meta,
    batch_size: int = 256,
    device=None,
    tta: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, C) of the checkpoint whose CheckpointMeta is `meta`: eval mode, training's
    preprocessing, no random augmentation.
    `tta`: the mean softmax over the frame's symmetry views. The model's softmax only: the logit adjustment,
    the temperature and the decision rule are the Predictor's (dermaops.predictor), applied in one place."""
    import torch

    shape = meta.frame.shape
    if images_uint8_nhwc.ndim != 4 or images_uint8_nhwc.shape[1:] != (*shape, 3):
        expected = f"(N, {shape[0]}, {shape[1]}, 3)"
        raise StageError(f"images have shape {images_uint8_nhwc.shape}, the model expects {expected}")
    device = device or next(model.parameters()).device
    cuda = torch.device(device).type == "cuda"
    model = model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format).eval()
    views = symmetry_views(shape) if tta else (0,)
    out = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for start in range(0, len(images_uint8_nhwc), batch_size):
            batch = torch.from_numpy(images_uint8_nhwc[start : start + batch_size]).to(device)
            x = to_input(batch, meta, channels_last=cuda)
            proba = sum(torch.softmax(model(dihedral_view(x, k)).float(), dim=1) for k in views) / len(views)
            out.append(proba.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(meta.classes)), dtype=np.float32)
