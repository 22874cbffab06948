"""The checkpoint contract: what a DermaOps model checkpoint (cnn.pt, cnn_phase1.pt) holds, written and read
here only.

A checkpoint is one torch file, `{"model_state": the state_dict, "meta": a plain dict}` (plain: checkpoints
load with `weights_only=True`, and the meta also travels as JSON in registry records). `CheckpointMeta` is
that dict typed: how to rebuild the network and preprocess its input (arch, classes, frame, stem,
normalisation), where the best epoch was reached, where the training data came from, and what train fitted
on validation afterwards (logit adjustment, temperature, melanoma threshold, the prediction guards of
dermaops.guards). Every reader uses the typed object; `save_checkpoint` and `load_checkpoint` are the only
code that touches the dict.

Versions. `version` is CHECKPOINT_VERSION when written. Version 1 is the shape the code wrote before the
contract was numbered, so a file without a `version` key that has version 1's fields loads as version 1
(every checkpoint in a registry today). Any other version, a torch file that is not a checkpoint, or a meta
missing a required field or carrying an unknown one is refused with one line naming the file and what is
wrong: a checkpoint is never scored with fields guessed. Bump the version when a field changes meaning or
becomes required, and teach `from_dict` to read the older one.

Standard library only at import time (the light image imports dermaops.prediction, which imports this).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from dermaops.errors import StageError
from dermaops.frame import Frame

CHECKPOINT_VERSION = 1
REQUIRED = ("arch", "classes", "image_size", "mean", "std")
# Written for readers of the stored dict (metrics.json's model_meta), derived from the frame on reading.
DERIVED = ("input_shape",)
OOD_ARRAYS = ("means", "precision")  # the detector's matrices: the bulky part of `ood`


def is_probability(value: object) -> bool:
    """A number in [0, 1] (not a bool): what a stored threshold on a probability must be."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0.0 <= value <= 1.0


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class CheckpointMeta:
    # How to rebuild the network and feed it (required).
    arch: str
    classes: tuple[str, ...]
    image_size: int  # the frame's size (its width)
    mean: tuple[float, ...]  # the input normalisation
    std: tuple[float, ...]
    geometry: str = "squash"  # checkpoints written before geometries were squashed
    stem: str = "auto"
    pretrained: str = "none"  # the initial weights: none, imagenet, a path or s3 URI
    version: int = CHECKPOINT_VERSION
    # Where the best epoch was reached (the trainer's best checkpoints).
    phase: int | None = None
    epoch: int | None = None
    val: dict | None = None  # validation figures of that epoch (loss, acc, weighted_f1, macro_f1)
    # Where the training data came from (the train stage).
    dataset_version: str | None = None
    split_uri: str | None = None
    image_cache: str | None = None
    fingerprint: str | None = None  # the train output's fingerprint: a resume only continues its own training
    # Fitted on validation after training, applied by dermaops.predictor.Predictor in this order.
    logit_bias: tuple[float, ...] | None = None
    logit_adjustment: dict | None = None  # what the adjustment's fit did
    temperature: float | None = None
    mel_threshold: float | None = None  # the melanoma operating point on the calibrated p(mel)
    calibration: dict | None = None  # what the temperature and threshold fit did
    # The prediction guards (dermaops.guards).
    referral: dict | None = None
    ood: dict | None = None
    train_prior: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # JSON and torch give lists; tuples keep the frozen object's value fixed and equal across a round trip.
        for name in ("classes", "mean", "std", "logit_bias", "train_prior"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def for_model(cls, arch: str, classes, frame: Frame | int, stem: str, pretrained: str, **facts) -> CheckpointMeta:
        """The meta of a network about to be trained: what rebuilds it and preprocesses its input (a bare size is
        its squashed square), plus `facts` (e.g. the provenance fields)."""
        from dermaops.config import RESNETS
        from dermaops.models import IMAGENET_MEAN, IMAGENET_STD, resolve_stem

        frame = Frame.of(frame)
        return cls(
            arch=arch,
            classes=tuple(classes),
            image_size=frame.size,
            geometry=frame.geometry,
            stem=resolve_stem(stem, min(frame.shape)) if arch in RESNETS else "imagenet",
            pretrained=pretrained,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            **facts,
        )

    @property
    def frame(self) -> Frame:
        return Frame(self.geometry, int(self.image_size))

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.frame.shape

    def replace(self, **changes) -> CheckpointMeta:
        """A copy with `changes` (field names; a fit's result dict spreads into it)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The stored form: plain lists and dicts, every field, and the derived input shape."""
        out = asdict(self)
        for name, value in out.items():
            if isinstance(value, tuple):
                out[name] = list(value)
        out["input_shape"] = list(self.input_shape)
        return out

    def record(self) -> dict:
        """The stored form without the detector's matrices: what a JSON record describing the model keeps
        (metrics, registry records); `from_dict` reads it back."""
        kept = self.replace(ood={k: v for k, v in self.ood.items() if k not in OOD_ARRAYS}) if self.ood else self
        return kept.to_dict()

    @classmethod
    def from_dict(cls, meta: object, source: object) -> CheckpointMeta:
        """The typed meta of a stored dict; StageError (one line naming `source`) when it is not one this code
        reads: another version, a missing required field, an unknown field, a value of the wrong kind."""
        if not isinstance(meta, dict):
            raise StageError(f"not a DermaOps model checkpoint: {source} (its meta is a {type(meta).__name__})")
        version = meta.get("version", 1)  # unnumbered: written before the contract, version 1's shape
        if version != CHECKPOINT_VERSION:
            age = "newer" if isinstance(version, int) and version > CHECKPOINT_VERSION else "another"
            raise StageError(
                f"{source} is a version {version!r} checkpoint, {age} than the version {CHECKPOINT_VERSION} this "
                "code reads: score it with the DermaOps release that wrote it, or retrain"
            )
        missing = [name for name in REQUIRED if meta.get(name) is None]
        if missing:
            raise StageError(
                f"not a DermaOps model checkpoint: {source} (its meta lacks {', '.join(missing)}; "
                f"version {CHECKPOINT_VERSION} requires {', '.join(REQUIRED)})"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(meta) - known - set(DERIVED))
        if unknown:
            raise StageError(
                f"{source}: unknown checkpoint meta field(s) {', '.join(unknown)} for version {CHECKPOINT_VERSION} "
                "(written by another DermaOps release?)"
            )
        try:
            out = cls(**{k: v for k, v in meta.items() if k in known})
            out.frame  # noqa: B018 - the geometry and size are checked by Frame
        except (TypeError, ValueError, StageError) as exc:
            raise StageError(f"{source}: unusable checkpoint meta ({_one_line(exc)})") from exc
        out._check_values(source)
        return out

    def _check_values(self, source: object) -> None:
        """The fitted numbers every consumer relies on, checked once where they are read."""
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0):
            raise StageError(f"{source}: the checkpoint's meta temperature is {t!r}; it must be a finite number > 0")
        m = self.mel_threshold
        if m is not None and not is_probability(m):
            raise StageError(
                f"{source}: mel_threshold in the checkpoint meta is {m!r}; it must be a number between 0 and 1"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise StageError(
                f"{source}: the checkpoint's normalisation needs 3 channels (mean {self.mean}, std {self.std})"
            )


def save_checkpoint(path, model, meta: CheckpointMeta) -> Path:
    """Write `model`'s weights (on the CPU) and `meta` to `path`, stamped with this code's version."""
    import torch

    if not isinstance(meta, CheckpointMeta):
        raise TypeError(f"save_checkpoint takes a CheckpointMeta, got {type(meta).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model_state": state, "meta": meta.replace(version=CHECKPOINT_VERSION).to_dict()}, path)
    return path


def _read(path) -> tuple[dict, CheckpointMeta]:
    """(state_dict, typed meta) of the file at `path`; StageError naming it when it is not a checkpoint."""
    import torch

    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # torch's own messages run over several lines (the weights_only explanation): one line is kept.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageError(f"not a DermaOps model checkpoint: {path} (not a readable torch file: "
                         f"{type(exc).__name__}: {_one_line(first)[:200]})") from exc  # fmt: skip
    if not isinstance(blob, dict) or "meta" not in blob or "model_state" not in blob:
        what = f"a dict of {len(blob)} entries, a bare state_dict?" if isinstance(blob, dict) else type(blob).__name__
        raise StageError(f"not a DermaOps model checkpoint: {path} (no model_state and meta: {what})")
    return blob["model_state"], CheckpointMeta.from_dict(blob["meta"], path)


def read_meta(path) -> CheckpointMeta:
    """The typed meta of the checkpoint at `path`, without building its model."""
    return _read(path)[1]


def load_checkpoint(path, device: str = "cpu"):
    """(model in eval mode on `device`, CheckpointMeta) from a file written by save_checkpoint; StageError
    (one line) for a file that is not one, or whose weights do not fit the network its meta describes."""
    from dermaops.models import build_model

    state, meta = _read(path)
    model = build_model(meta.arch, len(meta.classes), meta.image_size, "none", meta.stem)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise StageError(f"{path}: the weights do not fit a {meta.arch} of its meta ({_one_line(first)})") from exc
    return model.to(device).eval(), meta
