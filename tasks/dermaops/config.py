"""Every stage setting, defined once: type, default, bounds, help, and whether the DAG's trigger form offers it.

A stage's settings are one frozen dataclass (`TrainConfig`, ...). Everything else is derived from it:

- the argparse flags (`add_arguments`): `max_train_images` becomes `--max-train-images`, a bool `--x/--no-x`;
- the checks (`from_args`): every number finite and within its bounds, run by the CLI right after
  parsing, before the stage reads, writes or deletes anything (exit 2, one line naming the flag);
- the fingerprint inputs (`fingerprint_inputs`): the settings that change what the stage produces;
- the DAG's trigger-form `Param` schemas (`param_schema`) and the argv items the DAG renders from
  them (`dag_argv`), including the named recipes (`RECIPES`) whose values a blank param takes.

Adding a setting is one field here plus the code that uses it. This module imports nothing heavy
(the DAG file and the Airflow plugin import it at parse time): the standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from dermaops import drift as _drift
from dermaops.errors import StageError
from dermaops.frame import GEOMETRIES, Frame  # standard library only, like this module
from dermaops.redaction import SOURCE_TOKEN_ENV, URL_CREDENTIAL_PATTERN, has_url_secret

# torchvision classifiers the train stage builds (dermaops.models adapts each: head, stages, stem).
RESNETS = ("resnet18", "resnet34", "resnet50")
ARCHS = (
    *RESNETS, "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
    "convnext_tiny",
)  # fmt: skip
STEMS = ("auto", "imagenet", "small", "compact")
AUTO_AUGMENTS = ("none", "trivial", "randaugment")  # dermaops.augment.PolicyAugment
DEVICES = ("auto", "cpu", "cuda")
# What predict can draw a Grad-CAM of, per image (dermaops.prediction.draw_gradcams): nothing, the predicted
# class, or the melanoma score. Here, not in prediction.py, so that this module stays standard-library only.
GRADCAM_TARGETS = ("none", "predicted", "mel")
# The drift policies and the PSI threshold are the drift module's (standard library only at import, too).
DRIFT_POLICIES, DEFAULT_PSI = _drift.POLICIES, _drift.DEFAULT_PSI
PRIMARY_METRICS = ("macro_f1", "weighted_f1", "balanced_accuracy", "accuracy", "macro_auc")
SPLIT_STRATEGIES = ("lesion", "image", "dermamnist")
BASELINE_CLASS_WEIGHTS = ("balanced", "none")
SEED_MAX = 2**32 - 1  # numpy and sklearn seeds are unsigned 32-bit
# The Dataverse server that publishes HAM10000 (dermaops.sources resolves a bare doi:... against it).
DEFAULT_DATAVERSE_URL = "https://dataverse.harvard.edu"


@dataclass(frozen=True)
class Setting:
    """What a config field is besides its type and default."""

    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed (a learning rate of 0)
    hi_open: bool = False
    choices: tuple = ()
    param_choices: tuple = ()  # the subset the trigger form offers, when some choices need flags it does not pass
    # (choice, what it does) for every choice: the help lists the ones offered where it is shown, so the
    # trigger form never describes a choice it does not offer.
    choice_help: tuple[tuple[str, str], ...] = ()
    # The trigger-form param that feeds this flag (True: the field's own name). `owner=False` when the
    # param is defined by another stage's field (one seed for split, baseline and train).
    param: bool | str = False
    owner: bool = True
    title: str | None = None
    # In the fingerprint: True; False for settings that cannot change the outputs (threads, device);
    # "if-set" for settings added later, left out at their default so earlier outputs stay valid.
    fingerprint: bool | str = True
    fingerprint_key: str | None = None  # the key earlier fingerprints used, when it is not the field's name

    def describe(self, choices: tuple | None = None) -> str:
        """The help text, with what each of `choices` (default: all) does when the setting says so."""
        if not self.choice_help:
            return self.help
        offered = self.choices if choices is None else choices
        return f"{self.help}: " + "; ".join(f"{c} = {what}" for c, what in self.choice_help if c in offered)


def setting(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(help=help, **spec)})


@functools.cache  # the classes never change; the DAG file asks for every param at parse time
def _settings(cls) -> tuple[tuple[dataclasses.Field, Setting, type, bool], ...]:
    """(field, Setting, base type, nullable) of each setting field of a config class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        if spec is None:
            continue
        kind, nullable = hints[f.name], False
        args = typing.get_args(kind)
        if type(None) in args:
            nullable, kind = True, next(a for a in args if a is not type(None))
        out.append((f, spec, kind, nullable))
    return tuple(out)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def bounds_text(spec: Setting) -> str:
    """The allowed values in words: "1..4", ">= 0", "> 0 and <= 1", "one of a, b"."""
    if spec.choices:
        return "one of " + ", ".join(map(str, spec.choices))
    if spec.lo is not None and spec.hi is not None and not (spec.lo_open or spec.hi_open):
        return f"{_num(spec.lo)}..{_num(spec.hi)}"
    parts = []
    if spec.lo is not None:
        parts.append(f"{'>' if spec.lo_open else '>='} {_num(spec.lo)}")
    if spec.hi is not None:
        parts.append(f"{'<' if spec.hi_open else '<='} {_num(spec.hi)}")
    return " and ".join(parts)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _in_bounds(spec: Setting, value: float) -> bool:
    if spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo):
        return False
    return not (spec.hi is not None and (value >= spec.hi if spec.hi_open else value > spec.hi))


class StageConfig:
    """Base of the per-stage config dataclasses: the derivations every stage shares."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f, spec, kind, _ in _settings(cls):
            kwargs: dict[str, Any] = {"default": f.default, "dest": f.name}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = kind
                if spec.choices:
                    kwargs["choices"] = spec.choices
            extra = (
                ""
                if spec.choices or kind is bool or not (spec.lo is not None or spec.hi is not None)
                else (f" ({bounds_text(spec)})")
            )
            parser.add_argument(flag(f.name), help=spec.describe() + extra, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The config of parsed flags; StageError (exit 2) naming the first flag that is not finite or in bounds."""
        values = {}
        for f, spec, kind, _ in _settings(cls):
            value = getattr(args, f.name)
            if value is not None and kind in (int, float):
                if not math.isfinite(value):
                    raise StageError(f"{flag(f.name)} must be a finite number, got {value}")
                if not _in_bounds(spec, value):
                    raise StageError(f"{flag(f.name)} must be {bounds_text(spec)}, got {value}")
            values[f.name] = value
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Rules across settings (override); single-setting bounds are checked by from_args."""

    @classmethod
    def recipe_fields(cls) -> tuple[str, ...]:
        """The settings that can change what the stage produces (every field not kept out of the fingerprint):
        what a model card lists as the recipe, so a new setting reaches it with no edit."""
        return tuple(f.name for f, spec, _, _ in _settings(cls) if spec.fingerprint is not False)

    def fingerprint_inputs(self) -> dict[str, Any]:
        out = {}
        for f, spec, _, _ in _settings(type(self)):
            value = getattr(self, f.name)
            if spec.fingerprint is False or (spec.fingerprint == "if-set" and value == f.default):
                continue
            out[spec.fingerprint_key or f.name] = value
        return out


# -- the stages' settings -----------------------------------------------------------------------------
def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1), train, val, test; ValueError naming the problem otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"expected 3 comma-separated numbers (train,val,test), got {text!r}")
    try:
        fractions = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"not numbers: {text!r} (expected e.g. 0.8,0.1,0.1)") from None
    if any(not math.isfinite(f) or f <= 0 for f in fractions):
        raise ValueError(f"every fraction must be > 0, got {text!r}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {text!r} (sum {sum(fractions):g})")
    return fractions


@dataclass(frozen=True)
class SplitConfig(StageConfig):
    strategy: str = setting(
        "lesion",
        "how images are assigned to splits",
        choices=SPLIT_STRATEGIES,
        choice_help=(
            ("lesion", "stratified by dx and grouped by lesion_id (honest)"),
            ("image", "image-level like the seed report (leaks lesions, for comparison only)"),
            ("dermamnist", "the official DermaMNIST assignment (needs --official-splits)"),
        ),
        # dermamnist needs --official-splits, which the DAG does not pass.
        param_choices=("lesion", "image"),
        param="split_strategy",
        title="Split strategy",
    )
    seed: int = setting(
        42, "random seed of the split, the baseline and the CNN training", lo=0, hi=SEED_MAX, param=True,
        title="Random seed",
    )  # fmt: skip
    fractions: str = setting(
        "0.8,0.1,0.1",
        "train,val,test fractions of each class's images, > 0 and summing to 1 (lesion and image strategies)",
    )

    def check(self) -> None:
        try:
            parse_fractions(self.fractions)
        except ValueError as exc:
            raise StageError(f"{flag('fractions')}: {exc}") from None

    @property
    def fraction_values(self) -> tuple[float, float, float]:
        return parse_fractions(self.fractions)


@dataclass(frozen=True)
class BaselineConfig(StageConfig):
    class_weight: str = setting(
        "balanced",
        "balanced: weight classes by inverse frequency; none: plain majority-driven fit",
        choices=BASELINE_CLASS_WEIGHTS,
    )
    n_estimators: int = setting(
        300, "trees in the Random Forest baseline", lo=1, hi=5000, param="baseline_trees", title="Baseline trees"
    )
    max_depth: int | None = setting(None, "maximum tree depth (default: unlimited)", lo=1, hi=1000)
    min_samples_leaf: int = setting(2, "minimum samples per leaf", lo=1, hi=100_000)
    image_size: int = setting(
        28, "image cache size (px) the features are computed on", lo=8, hi=512, param=True, owner=False
    )
    # The CNN's frame too (the params are shared): both read one decoded-image cache.
    geometry: str = setting(
        "squash", "image geometry the features are computed on", choices=GEOMETRIES, param=True, owner=False,
        fingerprint="if-set",
    )  # fmt: skip
    seed: int = setting(42, "random seed of the forest", lo=0, hi=SEED_MAX, param=True, owner=False)
    n_jobs: int = setting(-1, "parallel tree jobs (-1: all cores)", lo=-1, hi=1024, fingerprint=False)

    def check(self) -> None:
        if self.n_jobs == 0:
            raise StageError("--n-jobs must be a positive count or -1 for all cores (got 0)")


@dataclass(frozen=True)
class TrainConfig(StageConfig):
    arch: str = setting(
        "resnet50", "torchvision classifier (dermaops.models fits its stem and head)", choices=ARCHS, param=True,
        title="Architecture",
    )  # fmt: skip
    pretrained: str = setting(
        "none",
        "initial weights: none, imagenet (torchvision weights, must be in the torch hub cache), or a local path / "
        "s3:// URI to a state_dict or DermaOps checkpoint",
        param=True,
        title="Initial weights",
    )
    image_size: int = setting(
        64,
        "input width in px (the image cache resizes; the height follows from --geometry)",
        lo=8,
        hi=512,
        param=True,
        title="Image size in px",
    )
    geometry: str = setting(
        "squash",
        "what of the picture the input keeps: squash = the whole picture resized to a square; aspect = the whole "
        "picture at its 4:3 shape (200 -> 150x200); crop = the centre square, as DermaMNIST does",
        choices=GEOMETRIES,
        param=True,
        title="Image geometry",
        fingerprint="if-set",
    )
    stem: str = setting(
        "auto",
        "ResNet stem: imagenet (7x7 stride 2 + max-pool), small (3x3 stride 1, no max-pool), compact (3x3 stride 1 "
        "+ max-pool: half the small stem's resolution, about a quarter of its compute); auto = small below 40 px",
        choices=STEMS,
    )
    epochs: int = setting(
        20,
        "phase-1 epochs: the classifier head on a frozen backbone with pretrained weights, the whole network "
        "with --pretrained none",
        lo=0,
        hi=500,
        param=True,
        title="Epochs (phase 1)",
    )
    finetune_epochs: int = setting(
        5, "phase-2 epochs: the last --finetune-depth residual stages and the head", lo=0, hi=200, param=True,
        title="Fine-tuning epochs (phase 2)",
    )  # fmt: skip
    finetune_depth: int = setting(
        1, "residual stages unfrozen in phase 2 (1 = layer4)", lo=1, hi=4, param=True, title="Fine-tuning depth"
    )
    batch_size: int = setting(128, "training batch size", lo=1, hi=4096, param=True, title="Batch size")
    lr: float = setting(
        2e-3, "phase-1 peak learning rate (AdamW, one-cycle)", lo=0, lo_open=True, hi=1, param=True,
        title="Learning rate (phase 1)",
    )  # fmt: skip
    finetune_lr: float = setting(
        1e-5, "phase-2 peak learning rate", lo=0, lo_open=True, hi=1, param=True, title="Learning rate (phase 2)"
    )
    weight_decay: float = setting(5e-4, "AdamW weight decay", lo=0, hi=1, param=True, title="Weight decay")
    label_smoothing: float = setting(
        0.0, "label smoothing of the training loss", lo=0, hi=0.5, param=True, title="Label smoothing"
    )
    class_weights: bool = setting(True, "weight the loss by inverse class frequency of the training split")
    class_weight_power: float = setting(
        1.0,
        "class weight = (inverse class frequency) ** power: 1 balances the classes fully, 0.5 is milder (better "
        "accuracy, slightly lower minority recall), 0 turns class weights off",
        lo=0,
        hi=2,
        param=True,
        title="Class weight power",
    )
    loss_tau: float = setting(
        0.0,
        "logit-adjusted cross-entropy (Menon et al., 2021): the loss sees logits + tau * log(training class prior), "
        "so the model's own logits learn the class-balanced posterior; 1 = balanced softmax, 0 = plain "
        "cross-entropy. It corrects for the imbalance as class weights do, without their noisy large gradients on "
        "a few rare images: use one or the other (--class-weight-power 0 with tau > 0)",
        lo=0,
        hi=3,
        param=True,
        title="Logit-adjusted loss tau",
        fingerprint="if-set",
    )
    augment: bool = setting(True, "augment training batches")
    sampling_power: float = setting(
        1.0,
        "class-balanced sampling: an epoch draws its images with probability proportional to (class frequency) ** "
        "(power - 1), with replacement: 1 = every image once per epoch, in a shuffled order (no resampling); 0.5 = "
        "square-root sampling; 0 = every class equally often. Below 1, lower --class-weight-power too (both "
        "correct for the imbalance)",
        lo=0,
        hi=1,
        param=True,
        title="Class sampling power",
        fingerprint="if-set",
    )
    epoch_images: int | None = setting(
        None,
        "images drawn per epoch (default: the training split's size); with --sampling-power 1 and fewer images "
        "than the split, each epoch is a fresh random subset. A compute budget: epochs x epoch images",
        lo=1,
        hi=10**8,
        param=True,
        title="Images per epoch",
        fingerprint="if-set",
    )
    auto_augment: str = setting(
        "none",
        "an augmentation policy per training image on top of --augment, from torchvision's v2 transforms: "
        "trivial = TrivialAugmentWide (one random op of random strength), randaugment = RandAugment (2 ops at "
        "magnitude 9); none = off. Applied per image on the training device, on uint8 pixels, before --augment's "
        "flips, turns and colour jitter",
        choices=AUTO_AUGMENTS,
        param=True,
        title="Augmentation policy",
        fingerprint="if-set",
    )
    patience: int = setting(5, "early stopping: epochs without a better val macro F1 (0 = off)", lo=0, hi=1000)
    # On by default: tau = 0 (no adjustment) is among the candidates, so the fitted rule never lowers the
    # validation macro F1, and it is what gives the rare classes (df, vasc) any recall at all.
    calibrate: bool = setting(
        True,
        "after training, fit a logit adjustment (bias = -tau * log train prior, the one tau in -0.5..1.5 that "
        "maximises val macro F1 on val predictions scored as evaluate scores, TTA included when tta is on) and store "
        "it in cnn.pt's meta; every predict_proba of that checkpoint applies it",
        param=True,
        title="Fit a decision rule on validation",
    )
    seed: int = setting(42, "random seed (init, shuffling, augmentation)", lo=0, hi=SEED_MAX, param=True, owner=False)
    mel_sensitivity: float = setting(
        0.85,
        "target melanoma sensitivity of the operating point: after training, the highest threshold on the "
        "calibrated p(mel) that finds this share of the VALIDATION melanomas is stored as mel_threshold in cnn.pt's "
        "meta (with the temperature fitted on validation); evaluate reports test sensitivity and specificity at it",
        lo=0,
        lo_open=True,
        hi=1,
        param=True,
        title="Melanoma target sensitivity",
        fingerprint="if-set",
    )
    tta: bool = setting(
        True,
        "score validation with test-time augmentation when fitting the temperature and the melanoma threshold: "
        "the same inference evaluate and predict use (the DAG passes evaluate's tta param)",
        param=True,
        owner=False,
        fingerprint="if-set",
    )
    referral_accuracy: float = setting(
        0.90,
        "target accuracy of the images predict decides rather than refers: after training, the lowest threshold on "
        "the calibrated confidence (largest probability) at which the decided VALIDATION images reach this accuracy "
        "is stored in cnn.pt's meta (dermaops.guards); predict refers every image below it to a clinician, evaluate "
        "reports the test coverage and accuracy at it",
        lo=0,
        lo_open=True,
        hi=1,
        param=True,
        title="Referral: target accuracy of decided images",
        fingerprint="if-set",
    )
    ood_tpr: float = setting(
        0.95,
        "share of the in-distribution VALIDATION images the out-of-distribution threshold keeps (the Mahalanobis "
        "distance of the penultimate-layer features to the nearest training class mean): 0.95 flags about 5 % of "
        "genuine dermatoscopy by design",
        lo=0.5,
        hi=1,
        hi_open=True,
        fingerprint="if-set",
    )
    num_threads: int = setting(0, "CPU threads for torch (0 = torch's default)", lo=0, hi=1024, fingerprint=False)
    device: str = setting("auto", "training device", choices=DEVICES, fingerprint=False)
    # Not a DAG param: how many processes fit is a fact of the host the task lands on (its GPUs), not of
    # the run; and not in the fingerprint, so a run killed on one host resumes on a host with other GPUs.
    nproc_per_node: int | None = setting(
        None,
        "training processes on this host, one per GPU, under torch.distributed's elastic launcher (NCCL on "
        "GPUs, gloo on CPU; --batch-size stays the global batch); default: the number of visible GPUs, else 1",
        lo=1,
        hi=64,
        fingerprint=False,
    )
    loader_workers: int | None = setting(
        None,
        "DataLoader worker processes per training process reading the image cache (0: read in the training "
        "process); default: the CPU cores per training process minus one, at most 8",
        lo=0,
        hi=64,
        fingerprint=False,
    )
    max_train_images: int | None = setting(
        None,
        "train on a seeded random subset of at most this many training images (quick runs, tests)",
        lo=2,
        hi=10**7,
        param=True,
        title="Max training images",
    )
    ema_decay: float = setting(
        0.0,
        "exponential moving average of the weights, updated every step with this decay (e.g. 0.999); validation, "
        "the best checkpoints and evaluation then use the averaged weights (0 = off)",
        lo=0,
        hi=1,
        hi_open=True,
        param=True,
        title="EMA decay",
        fingerprint="if-set",
    )

    # torchvision's reference recipes: --mixup-alpha 0.2 --cutmix-alpha 1.0 (both on: one of the two per batch).
    mixup_alpha: float = setting(
        0.0,
        "MixUp: blend each training image with another and their labels by lambda ~ Beta(alpha, alpha), one "
        "lambda per batch (0 = off; 0.2 in torchvision's reference recipes)",
        lo=0,
        hi=10,
        param=True,
        title="MixUp alpha",
        fingerprint="if-set",
    )
    cutmix_alpha: float = setting(
        0.0,
        "CutMix: paste a box of another training image, labels weighted by area, lambda ~ Beta(alpha, alpha) "
        "(0 = off; 1.0 in torchvision's reference recipes); with MixUp on too, each batch uses one of the two",
        lo=0,
        hi=10,
        param=True,
        title="CutMix alpha",
        fingerprint="if-set",
    )

    def check(self) -> None:
        if self.epochs + self.finetune_epochs == 0:
            raise StageError("--epochs and --finetune-epochs are both 0: nothing to train")

    def phase_epochs(self, phase: int) -> int:
        return self.epochs if phase == 1 else self.finetune_epochs

    def phase_lr(self, phase: int) -> float:
        return self.lr if phase == 1 else self.finetune_lr


@dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    primary_metric: str = setting("macro_f1", "metric the challenger must improve", choices=PRIMARY_METRICS)
    promotion_margin: float = setting(
        0.005,
        "the challenger must beat the re-scored champion's primary metric by more than this; on the 1,000-image "
        "lesion-grouped test split one more correct df image (of 11) moves macro F1 by about 0.004, so 0.005 asks "
        "for more than a single rare-image flip",
        lo=0,
        hi=1,
        param=True,
        title="Promotion margin",
        fingerprint_key="margin",
    )
    mel_recall_floor: float = setting(
        0.5,
        "minimum melanoma recall on the test split for any promotion (the seed model reached 0.55; below 0.5 the "
        "model misses most melanomas)",
        lo=0,
        hi=1,
        param=True,
        title="Melanoma recall floor",
        fingerprint_key="floor",
    )
    min_macro_f1: float = setting(
        0.25,
        "absolute floor on test macro F1 for any promotion, the first champion's included (the lesion-grouped "
        "quick recipe reaches about 0.43; a model that calls everything one class scores under 0.1); 0 = off",
        lo=0,
        hi=1,
        param=True,
        title="Minimum macro F1",
    )
    min_macro_auc: float = setting(
        0.75,
        "absolute floor on test macro one-vs-rest AUC for any promotion (0.5 = chance; the quick recipe reaches "
        "about 0.9); 0 = off",
        lo=0,
        hi=1,
        param=True,
        title="Minimum macro AUC",
    )
    allow_subset_promotion: bool = setting(
        False,
        "allow promoting a model trained on a max_train_images subset (never promoted otherwise)",
        param=True,
        title="Allow promoting a subset-trained model",
    )
    allow_broken_champion_override: bool = setting(
        False,
        "operator override, logged and recorded in the decision: when the registry's champion cannot be loaded "
        "(missing, corrupt, unreadable record), judge this model as if there were no champion instead of failing",
        param=True,
        title="Override a broken champion",
    )
    require_approval: bool = setting(
        False,
        "a challenger that passes the gate waits for a reviewer: evaluate records it as awaiting approval (registry "
        "pending/<run_id>.json) instead of writing champion.json, and the DAG's approve task asks for Approve or "
        "Reject in the UI's Required Actions (or the REST API); off, the gate promotes at once",
        param=True,
        title="Require a reviewer's approval before promotion",
        fingerprint="if-set",
    )
    subgroup_gate: bool = setting(
        False,
        "refuse a challenger whose melanoma sensitivity (at its own operating point) in any subgroup of sex, age band, "
        "localization or dx_type with at least subgroup_min_melanomas test melanomas is below the re-scored "
        "champion's beyond the paired lesion bootstrap (the upper bound of the 95 % interval of the difference "
        "is below 0); the decision names the group",
        param=True,
        title="Subgroup gate: no significant melanoma-sensitivity loss in any subgroup",
        fingerprint="if-set",
    )
    subgroup_min_melanomas: int = setting(
        10,
        "test melanomas a subgroup needs for the subgroup gate to judge it (fewer: reported, marked, not judged)",
        lo=1,
        hi=100_000,
        param=True,
        title="Subgroup gate: minimum melanomas per group",
        fingerprint="if-set",
    )
    gradcam_images: int = setting(8, "melanoma test images in the Grad-CAM grid", lo=1, hi=64)
    gradcam: bool = setting(
        True,
        "Grad-CAM of the melanoma score on every melanoma test image: the grid and the localization ratio "
        "(one forward and backward pass over the melanomas)",
        fingerprint="if-set",
    )
    score_phase1: bool = setting(
        True,
        "also score the best phase-1 checkpoint for the model comparison (one more scoring pass; skipped when it is "
        "the same file as cnn.pt)",
        fingerprint="if-set",
    )
    tta_ablation: bool = setting(
        False,
        "with --no-tta, also score the 8-view test-time augmentation for the ablation (8 more scoring passes); with "
        "--tta the single-view ablation comes free from the stored views",
        fingerprint="if-set",
    )
    bootstrap_resamples: int = setting(
        1000,
        "lesion-level bootstrap resamples for the 95 % intervals of the test metrics and the paired champion/"
        "challenger comparison",
        lo=100,
        hi=100_000,
        fingerprint="if-set",
    )
    tta: bool = setting(
        True,
        "test-time augmentation: average the softmax over the 8 flips/quarter turns of each image (every one is a "
        "valid view of a dermatoscopic image and training augments with them); applied alike to the challenger, "
        "the frozen model and the re-scored champion",
        param=True,
        title="Test-time augmentation",
    )
    batch_size: int = setting(256, "inference batch size", lo=1, hi=65536, fingerprint=False)
    device: str = setting("auto", "inference device", choices=DEVICES, fingerprint=False)


@dataclass(frozen=True)
class IngestConfig(StageConfig):
    """`ingest`'s settings (its source and its dataset prefix are its own flags): how it talks to the source.
    None is in the fingerprint: a dataset version is the hash of the bytes stored, however they came."""

    dataverse_url: str = setting(
        DEFAULT_DATAVERSE_URL, "Dataverse server for a bare doi:... --source", fingerprint=False
    )
    retries: int = setting(5, "extra attempts per request on transient failures", lo=0, hi=100, fingerprint=False)
    retry_base_delay: float = setting(
        2.0, "first backoff delay in seconds (doubles each attempt)", lo=0, hi=3600, fingerprint=False
    )
    retry_max_delay: float = setting(60.0, "cap on one backoff delay in seconds", lo=0, hi=3600, fingerprint=False)
    timeout: float = setting(
        60.0, "connect/read timeout per request in seconds", lo=0, hi=3600, lo_open=True, fingerprint=False
    )
    progress_every: float = setting(
        30.0, "seconds between download progress lines", lo=0, hi=86400, lo_open=True, fingerprint=False
    )

    def check(self) -> None:
        if self.retry_base_delay > self.retry_max_delay:
            raise StageError(
                f"need {flag('retry_base_delay')} <= {flag('retry_max_delay')} "
                f"(got {self.retry_base_delay} and {self.retry_max_delay})"
            )


@dataclass(frozen=True)
class ValidateConfig(StageConfig):
    """`validate`'s settings (its dataset, output, expectations folder and drift registry are its own flags):
    the bounds the expectation suites get as $PARAMETERs, and the drift comparison with the champion's data.
    The suites' parameters are in the stage's fingerprint through what they become (stages.validate)."""

    max_missing_age_fraction: float = setting(
        0.02, "fraction of rows allowed without an age before it is reported (HAM10000: 0.0057)", lo=0, hi=1
    )
    min_rows: int = setting(1, "fewest metadata rows accepted", lo=1, hi=10**7)
    max_rows: int = setting(20000, "most metadata rows accepted (HAM10000: 10,015)", lo=1, hi=10**7)
    min_lesions_per_class: int | None = setting(
        None,
        "fewest distinct lesions of each class (default: one per split, 3): a lesion-grouped split must put every "
        "class in train, val and test",
        lo=1,
        hi=10**6,
    )
    drift_policy: str = setting(
        "report",
        "what drift of this dataset against the champion's training data (labels, metadata, image statistics; the "
        "data-quality report's drift section) does",
        choices=DRIFT_POLICIES,
        choice_help=(
            ("report", "only the report shows it"),
            ("warn", "also a Slack warning"),
            ("fail", "the run stops before training"),
        ),
        param=True,
        title="Drift policy",
    )
    drift_threshold: float = setting(
        DEFAULT_PSI, "PSI at or above which a feature drifts (0.1 moderate, 0.25 major)", lo=0, hi=100,
        lo_open=True, hi_open=True,
    )  # fmt: skip
    drift_max_images: int = setting(
        2000, "images per dataset sampled (by id hash) for the image statistics", lo=10, hi=10**6
    )
    min_image_side: int = setting(8, "smallest plausible image width/height (px)", lo=1, hi=10**5)
    max_image_side: int = setting(10000, "largest plausible image width/height (px)", lo=1, hi=10**5)
    # The lesion share of the 10,015 real masks (ham10000-200px pack, pixels at 255 over all pixels):
    # min 0.0039, 0.1 % 0.0061, 1 % 0.0145, 5 % 0.0387, median 0.2223, 95 % 0.6385, 99 % 0.8345,
    # 99.9 % 0.9684, max 1.0. The lower bound, a quarter of the smallest real lesion (0.1 %: 270 pixels
    # of a 600x450 mask, 30 of a 200x150 one), refuses an empty or speck mask, which outlines no lesion
    # although every HAM10000 image shows one. There is no upper bound below 1: two real masks
    # (ISIC_0026042, ISIC_0029819) are all lesion, close-ups whose lesion fills the frame, and 19 cover
    # more than 95 %. A mask inverted as a whole set shows in the suite's median check instead.
    min_lesion_share: float = setting(
        0.001, "smallest share of a mask's pixels that are lesion (HAM10000: 0.0039)", lo=0, hi=1
    )
    max_lesion_share: float = setting(
        1.0, "largest share of a mask's pixels that are lesion (HAM10000: 1.0, close-ups)", lo=0, hi=1
    )

    def check(self) -> None:
        for low, high in (("min_rows", "max_rows"), ("min_image_side", "max_image_side"),
                          ("min_lesion_share", "max_lesion_share")):  # fmt: skip
            if getattr(self, low) > getattr(self, high):
                raise StageError(
                    f"need {flag(low)} <= {flag(high)} (got {getattr(self, low)} and {getattr(self, high)})"
                )


@dataclass(frozen=True)
class PredictConfig(StageConfig):
    """`predict`'s settings (its input and output locations are its own flags): how it scores, and the
    prediction-monitoring bounds (dermaops.monitoring; a batch past one posts a Slack alert, and changes no
    prediction). The batch DAG's trigger form offers the ones marked param."""

    gradcam: str = setting(
        "none",
        "also write a Grad-CAM PNG per image",
        choices=GRADCAM_TARGETS,
        choice_help=(
            ("none", "no Grad-CAM"),
            ("predicted", "of the predicted class"),
            ("mel", "of the melanoma score"),
        ),
        param=True,
        title="Grad-CAM",
    )
    tta: bool = setting(
        True,
        "average the softmax over the frame's symmetry views (flips, and quarter turns of a square frame), as "
        "evaluate scores the model (a forward per view)",
        param=True,
        title="Test-time augmentation",
    )
    batch_size: int = setting(64, "images decoded and scored at once", lo=1, hi=4096, fingerprint=False)
    device: str = setting("auto", "inference device", choices=DEVICES, fingerprint=False)

    max_class_mix_shift: float = setting(
        0.3,
        "alert when the batch's predicted class mix differs from the model's training prior by more than this total "
        "variation distance (the share of predictions that would have to change class)",
        lo=0,
        hi=1,
        param=True,
        title="Monitoring: class-mix bound",
        fingerprint=False,
    )
    max_ood_rate: float = setting(
        0.2,
        "alert when more than this share of the batch is out of distribution (about 5 % of genuine dermatoscopy is "
        "flagged by design)",
        lo=0,
        hi=1,
        param=True,
        title="Monitoring: out-of-distribution bound",
        fingerprint=False,
    )


CONFIGS: dict[str, type[StageConfig]] = {
    "ingest": IngestConfig,
    "validate": ValidateConfig,
    "split": SplitConfig,
    "train_baseline": BaselineConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}

# -- the DAG's trigger form ---------------------------------------------------------------------------
DATAVERSE_SOURCE = f"{DEFAULT_DATAVERSE_URL}/dataset.xhtml?persistentId=doi:10.7910/DVN/DBW86T"
# The data source is the deployment's, not a run's: the weekly schedule retrains on whatever it holds. This
# Airflow Variable (or AIRFLOW_VAR_DERMAOPS_SOURCE) names it; `scripts/stack seed` sets it. Unset: Dataverse.
SOURCE_VARIABLE = "dermaops_source"
# The Airflow connection ingest's credentials come from (the runner's "source" secret set).
SOURCE_CONNECTION = "dermaops_source"
# Why a `source` param with a URL password or a token query parameter is refused when the run is triggered:
# params are stored in the run's conf, shown in the UI and rendered into the task's command line.
SOURCE_CREDENTIALS_RULE = (
    f"the source URL must carry no credential (no user:password@, no ?key=, ?token=, ?api_key=...): put the "
    f"token in the Airflow connection {SOURCE_CONNECTION} (password; login for a user, host to limit where it "
    f"is sent) or in {SOURCE_TOKEN_ENV} on the workers; ingest sends it to the source in a header"
)


def run_source(param: str | None, variable: str | None) -> str:
    """The source a run ingests: its `source` param when one was typed, else the deployment's (the Airflow
    Variable SOURCE_VARIABLE), else Harvard Dataverse. A credential in the Variable is refused as in the
    param (it would be rendered into ingest's command line): ValueError, one line naming the Variable."""
    for value, where in ((param, "the source param"), (variable, f"the Airflow Variable {SOURCE_VARIABLE}")):
        value = (value or "").strip()
        if not value:
            continue
        if has_url_secret(value):
            raise ValueError(f"{where}: {SOURCE_CREDENTIALS_RULE}")
        return value
    return DATAVERSE_SOURCE


# Named recipes: a blank (null) recipe param takes the chosen recipe's value. Chosen on the validation split of
# the 200 px pack with benchmarks/recipe_ablation.py (docs/measurements.md has every run and says which are one
# seed and which three).
# quick-cpu (the main command's; training <= 6 min on 2 cores): ResNet18 on the whole picture squashed to 48 px,
# 5 epochs of 4,000 class-balanced draws (20,000 images seen, the budget of 3 natural epochs). Validation
# macro F1 (decision rule fitted on validation), one seed each: balanced draws 0.546 and square-root 0.539
# (6 x 4,000), natural epochs 0.500 (3 epochs); the 4:3 frame at 64 px 0.498, the centre crop 0.468 (DermaMNIST's
# geometry), TrivialAugment 0.365 at 3 epochs (too strong for so short a schedule), MobileNetV3-Small 0.457-0.487
# (8 epochs at 64 px), RegNetX-400MF 0.365.
# full-gpu: the whole picture at the pack's full 200x150 (aspect kept), ResNet18, 30 + 3 epochs with
# TrivialAugment: NOT yet measured on a GPU (no GPU was lent since the 200 px pack arrived);
# benchmarks/gpu_quality.sh measures it and sweeps its levers in one device call.
RECIPES: dict[str, dict[str, Any]] = {
    "quick-cpu": {
        "arch": "resnet18",
        "image_size": 48,
        "geometry": "squash",
        "epochs": 5,
        "finetune_epochs": 0,
        "finetune_depth": 2,
        "batch_size": 128,
        "lr": 3e-3,
        "finetune_lr": 3e-4,
        "label_smoothing": 0.1,
        "class_weight_power": 0.0,
        "sampling_power": 0.0,
        "epoch_images": 4000,
        "auto_augment": "none",
        "baseline_trees": 100,
        # 8-view TTA multiplies every evaluation pass by 8: on a CPU worker evaluate would cost more than
        # training itself.
        "tta": False,
    },
    "full-gpu": {
        "arch": "resnet18",
        "image_size": 200,
        "geometry": "aspect",
        "epochs": 30,
        "finetune_epochs": 3,
        "finetune_depth": 2,
        "batch_size": 128,
        "lr": 3e-3,
        "finetune_lr": 3e-4,
        "label_smoothing": 0.1,
        "class_weight_power": 0.5,
        "sampling_power": 1.0,
        "epoch_images": None,
        "auto_augment": "trivial",
        "baseline_trees": 300,
        "tta": True,
    },
}
DEFAULT_RECIPE = "quick-cpu"
# What each recipe is for (the rest of its description is derived from its values: `recipe_summary`).
RECIPE_PURPOSE = {
    "quick-cpu": "the main command's model, minutes on a CPU worker",
    "full-gpu": "meant for a GPU worker",
}


def recipe_summary(name: str) -> str:
    """One line of what a recipe trains, from its values: "resnet18 at 64x48 px (whole picture, 4:3 kept), 6 + 1
    epochs, TrivialAugment, ...: <purpose>"."""
    r = RECIPES[name]
    epochs = f"{r['epochs']} + {r['finetune_epochs']} epochs" if r["finetune_epochs"] else f"{r['epochs']} epochs"
    extras = [
        *([f"{r['auto_augment']} augmentation policy"] if r["auto_augment"] != "none" else []),
        *([f"class sampling power {r['sampling_power']}"] if r["sampling_power"] < 1 else []),
        *([f"{r['epoch_images']} images per epoch"] if r["epoch_images"] else []),
    ]
    return (
        f"{r['arch']} at {Frame(r['geometry'], r['image_size']).describe()}, {epochs}"
        + "".join(f", {extra}" for extra in extras)
        + f": {RECIPE_PURPOSE[name]}"
    )


# Trigger-form params that are not a stage setting: (default, JSON schema, title, description).
RUN_PARAMS: dict[str, dict[str, Any]] = {
    "recipe": {
        "default": DEFAULT_RECIPE,
        "enum": list(RECIPES),
        "title": "Recipe",
        "description": "; ".join(f"{name}: {recipe_summary(name)}" for name in RECIPES)
        + ". Every training param left blank takes the recipe's value.",
    },
    "source": {
        # Blank: the deployment's source (run_source), so the scheduled runs and a form left as it is ingest
        # the same data; a value typed in overrides it for this run.
        "default": None,
        "type": ["string", "null"],
        "minLength": 1,
        # Airflow validates this when the run is triggered, before the run (and its conf) is stored. A JSON
        # schema error has no custom message, but it prints the subschema: hence the rule as a $comment.
        # "type": a pattern constrains strings only, so without it `not` would refuse a blank (null) source.
        "not": {"$comment": SOURCE_CREDENTIALS_RULE, "type": "string", "pattern": URL_CREDENTIAL_PATTERN},
        "title": "Data source",
        "description": "Where HAM10000 comes from: an http(s) base URL, a Dataverse dataset URL or doi:..., an s3:// "
        "prefix, or a directory on the worker, in the official layout (metadata CSV + two image zips). Blank: the "
        f"deployment's source, the Airflow Variable {SOURCE_VARIABLE} (scripts/stack seed sets it), or when that is "
        f"unset Harvard Dataverse ({DATAVERSE_SOURCE}). "
        f"{SOURCE_CREDENTIALS_RULE[0].upper()}{SOURCE_CREDENTIALS_RULE[1:]}.",
    },
    # ["boolean", "null"]: Airflow's form marks every param whose type has no "null" as required, and a
    # switch is never "missing".
    "force_ingest": {
        "default": False,
        "type": ["boolean", "null"],
        "title": "Force ingest",
        "description": "On: re-download and re-verify the data even if this content is stored.",
    },
    "force_retrain": {
        "default": False,
        "type": ["boolean", "null"],
        "title": "Force retrain",
        "description": "On: train and evaluate even when the dataset version and the recipe equal the champion's "
        "(off, such a run skips train, train_baseline and evaluate: nothing would change), and retrain both models "
        "even if this run already has finished ones.",
    },
}

# The stages whose settings make the model. A run whose dataset version and whose values of these stages'
# trigger-form params (the recipe) equal the champion's has nothing new to train (dermaops.freshness);
# evaluate's params judge the model and are not part of it.
RECIPE_STAGES = ("split", "train_baseline", "train")


@functools.cache
def param_settings() -> dict[str, tuple[str, dataclasses.Field, Setting, type, bool]]:
    """param name -> (stage, field, Setting, base type, nullable) of the field that defines the param."""
    out: dict[str, tuple] = {}
    for stage, cls in CONFIGS.items():
        for f, spec, kind, nullable in _settings(cls):
            if spec.param and spec.owner:
                name = f.name if spec.param is True else spec.param
                out[name] = (stage, f, spec, kind, nullable)
    return out


def param_name(f: dataclasses.Field, spec: Setting) -> str:
    return f.name if spec.param is True else str(spec.param)


def param_schema(name: str) -> dict[str, Any]:
    """The JSON schema (plus default, title, description) of one trigger-form param.

    Numbers carry their bounds in the title, the description and the schema. Recipe params default to
    null ("the recipe's value"), so the form does not mark them required."""
    if name in RUN_PARAMS:
        return dict(RUN_PARAMS[name])
    _, f, spec, kind, nullable = param_settings()[name]
    return _schema(name, f, spec, kind, nullable)


def stage_param_schemas(cls: type[StageConfig]) -> dict[str, dict[str, Any]]:
    """The trigger-form params of a stage outside the retraining DAG (predict's), by name. No recipe there:
    each param defaults to its setting's default (predict's `tta` is not train's)."""
    return {
        param_name(f, spec): _schema(param_name(f, spec), f, spec, kind, nullable, recipes=False)
        for f, spec, kind, nullable in _settings(cls)
        if spec.param
    }


def _schema(
    name: str, f: dataclasses.Field, spec: Setting, kind: type, nullable: bool, recipes: bool = True
) -> dict[str, Any]:
    recipe = recipes and name in RECIPES[DEFAULT_RECIPE]
    default = None if recipe else f.default
    json_type = {bool: "boolean", int: "integer", float: "number", str: "string"}[kind]
    allowed = bounds_text(dataclasses.replace(spec, choices=spec.param_choices or spec.choices))
    title = spec.title or name
    schema: dict[str, Any] = {
        "default": default,
        "title": f"{title} ({allowed})" if allowed and not spec.choices else title,
    }
    offered = spec.param_choices or spec.choices
    if spec.choices:
        schema["enum"] = [*offered, *([None] if recipe or nullable else [])]
        if recipe:
            # The form's select shows a blank (null) choice as the text "null" unless told what it means.
            schema["values_display"] = {"null": f"the recipe's value ({recipe_values_text(name)})"}
    else:
        schema["type"] = [json_type, "null"] if recipe or nullable or kind is bool else json_type
    if kind is str and not spec.choices:
        schema["minLength"] = 1
    if kind in (int, float):
        # Under allOf, not at the top: Airflow 3.3's form hands a top-level minimum/maximum to its number
        # input, which silently clamps an out-of-range entry on blur. The form itself validates only
        # "required"; the bounds are validated when the run is triggered and shown in the description.
        bounds = {}
        if spec.lo is not None:
            bounds["exclusiveMinimum" if spec.lo_open else "minimum"] = spec.lo
        if spec.hi is not None:
            bounds["exclusiveMaximum" if spec.hi_open else "maximum"] = spec.hi
        schema["allOf"] = [bounds]
    text = spec.describe(offered)
    description = text[0].upper() + text[1:] + "."
    if allowed:
        description += f" Allowed: {allowed}."
    if recipe:
        description += f" Blank: the recipe's value ({recipe_values_text(name)})."
    elif default is not None:
        description += f" Default: {default}."
    schema["description"] = description
    return schema


def recipe_values_text(name: str) -> str:
    """What each named recipe sets a recipe param to: "quick-cpu 48, full-gpu 28"."""
    return ", ".join(f"{r} {'unset' if v[name] is None else v[name]}" for r, v in RECIPES.items())


def param_names() -> list[str]:
    return [*RUN_PARAMS, *param_settings()]


def resolve(params: typing.Mapping[str, Any], name: str) -> Any:
    """A trigger-form param's value for this run: the param, or when it is blank the recipe's value."""
    value = params.get(name)
    if value is None and name in RECIPES[DEFAULT_RECIPE]:
        recipe = params.get("recipe") or DEFAULT_RECIPE
        if recipe not in RECIPES:
            raise ValueError(f"recipe {recipe!r} is not one of {', '.join(RECIPES)}")
        value = RECIPES[recipe][name]
    return value


def recipe_param_names() -> list[str]:
    return [name for name, (stage, *_) in param_settings().items() if stage in RECIPE_STAGES]


def recipe_values(params: typing.Mapping[str, Any]) -> dict[str, Any]:
    """This run's recipe: every recipe param's value, blank ones resolved to the named recipe's value."""
    return {name: resolve(params, name) for name in recipe_param_names()}


def json_object_arg(text: str) -> dict:
    """argparse type of a flag that takes a JSON object (the DAG renders these from params and XCom)."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def recipe_arg(text: str) -> dict[str, Any]:
    """argparse type of `--recipe`: a JSON object of recipe params (what the DAG renders from its params)."""
    value = json_object_arg(text)
    unknown = sorted(set(value) - set(recipe_param_names()))
    if unknown:
        allowed = ", ".join(recipe_param_names())
        raise argparse.ArgumentTypeError(f"unknown recipe params {unknown} (allowed: {allowed})")
    return value


def argv_item(flag_name: str, value: Any) -> str:
    """One argv item for a flag and value ("" drops it: a blank optional setting keeps the stage's default)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return flag_name if value else "--no-" + flag_name[2:]
    return f"{flag_name}={value}"


def dag_argv(stage: str | type[StageConfig], recipes: bool = True) -> list[str]:
    """The Jinja argv items that pass a stage (or a config class) its trigger-form params. The macro
    dermaops_arg renders each, a blank recipe param as the recipe's value; with `recipes=False` (a DAG without
    recipes: the prediction DAG) dermaops_setting does, a blank param as no flag (the stage's default)."""
    macro = "dermaops_arg" if recipes else "dermaops_setting"
    items = []
    for f, spec, _, _ in _settings(CONFIGS[stage] if isinstance(stage, str) else stage):
        if spec.param:
            items.append(f"{{{{ {macro}(params, {param_name(f, spec)!r}, {flag(f.name)!r}) }}}}")
    return items
