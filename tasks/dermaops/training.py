"""The two-phase training loop: metrics, early stopping, best checkpoints, resumable state.

Phase 1 trains the classifier head on a frozen backbone (with pretrained weights), or the whole
network when there are no pretrained weights (a frozen random backbone would only give random
features). Phase 2 starts from the best phase-1 weights, unfreezes the last `finetune_depth`
stages of the backbone (ResNet: layer4 = 1; `models.stage_names`) and fine-tunes them with the head
at a lower learning rate.

Epochs are numbered globally (phase 2 continues phase 1's numbering). After every epoch the whole
state (model, optimizer, scheduler, weight average, RNG, `TrainState`) goes to `last.pt` through the
`on_saved` callback, before anything else can fail, so a killed run resumes at the next epoch with
the same numbering and its full history. `Trainer.resume` is the one place that reads it back.
Shuffling and augmentation draw from generators seeded by (seed, epoch), so a resumed epoch sees the
same batches as an uninterrupted one would.

With `loss_tau` > 0 the loss is the logit-adjusted cross-entropy (Menon et al., 2021): the training prior,
scaled by tau, is added to the logits inside the loss only, so the model's logits learn the class-balanced
posterior and the rare classes are predicted without any per-image reweighting.

With `ema_decay` > 0 an exponential moving average of the weights is kept alongside the model; it is
what validation scores and what the best checkpoints hold (so evaluate scores it too).

The data comes through DataLoaders over the image cache's shards (`CachedImages.dataset`): worker
processes copy each batch out of the memory-mapped shards as uint8, so memory does not grow with the
dataset; the training process moves it to the device, augments it there and feeds the model.
Distributed (dermaops.distributed), a DistributedSampler gives each rank its share of the same
shuffled order, `batch_size` stays the GLOBAL batch (each of W ranks takes batch_size / W), so the
steps per epoch, the learning-rate schedule and a checkpoint's meaning do not depend on the world
size: a run resumes with another one. Validation is split across the ranks and gathered, so every
rank takes the same decisions (best epoch, early stopping) from the same numbers.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from dermaops.augment import PolicyAugment, augment_batch, mix_batch
from dermaops.checkpoint import CheckpointMeta, read_meta, save_checkpoint
from dermaops.config import TrainConfig
from dermaops.distributed import SINGLE, Dist
from dermaops.errors import StageError
from dermaops.frame import Frame
from dermaops.metrics import classification_metrics
from dermaops.models import normalize, to_float

PROGRESS_EVERY_S = 30.0
EVAL_BATCH = 256

log = logging.getLogger(__name__)


# TrainConfig: re-exported from dermaops.config.
__all__ = ["EpochRecord", "TrainConfig", "TrainState", "Trainer", "WeightEMA"]


@dataclass
class Best:
    """Where a best validation macro F1 was reached."""

    epoch: int
    phase: int
    val_macro_f1: float


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch: a row of history.json (and of last.pt's history), the same keys as its fields."""

    phase: int
    epoch: int  # global, across both phases
    train_loss: float
    train_acc: float
    train_weighted_f1: float
    train_macro_f1: float
    images_per_s: float
    val_loss: float
    val_acc: float
    val_weighted_f1: float
    val_macro_f1: float
    lr: float  # at the end of the epoch
    seconds: float  # the epoch's wall time, validation included

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> EpochRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def val(self) -> dict:
        """The validation figures a best checkpoint's meta records ("val": loss, acc, weighted_f1, macro_f1)."""
        return {"loss": self.val_loss, "acc": self.val_acc, "weighted_f1": self.val_weighted_f1,
                "macro_f1": self.val_macro_f1}  # fmt: skip


@dataclass(frozen=True)
class EpochOutcome:
    """What an epoch changed: a new best overall (cnn.pt), a new best of phase 1 (cnn_phase1.pt), and whether
    early stopping ends its phase."""

    best: bool
    best_phase1: bool
    stop: bool


@dataclass
class TrainState:
    """Everything the loop needs to continue after a crash; saved in last.pt as a plain dict."""

    phase: int = 1
    phase_epoch: int = 0  # epochs finished in the current phase
    phase_done: bool = False  # the current phase ran all its epochs or stopped early
    epoch: int = 0  # global number of the last finished epoch
    history: list[EpochRecord] = field(default_factory=list)
    best: Best | None = None  # overall (cnn.pt)
    best_phase1: Best | None = None  # of phase 1 (cnn_phase1.pt)
    phase_best: Best | None = None  # of the current phase (early stopping)
    stale_epochs: int = 0  # epochs since phase_best improved

    def enter(self, phase: int) -> None:
        """Start `phase`: its epoch count, early-stopping best and patience counter from zero."""
        self.phase, self.phase_epoch, self.phase_done, self.phase_best, self.stale_epochs = phase, 0, False, None, 0

    def wants(self, phase: int, n_epochs: int) -> bool:
        """Whether `phase` (of `n_epochs`) still has epochs to run: not empty, not behind us, not finished."""
        return n_epochs > 0 and self.phase <= phase and not (self.phase == phase and self.phase_done)

    def record(self, row: EpochRecord, patience: int, phase_epochs: int) -> EpochOutcome:
        """Book-keeping of a finished epoch (pure: no I/O): the history, the bests, early stopping."""
        self.history.append(row)
        self.epoch = row.epoch
        self.phase_epoch += 1
        score = row.val_macro_f1
        entry = Best(row.epoch, row.phase, score)
        if self.phase_best is None or score > self.phase_best.val_macro_f1:
            self.phase_best, self.stale_epochs = entry, 0
        else:
            self.stale_epochs += 1
        best_phase1 = row.phase == 1 and (self.best_phase1 is None or score > self.best_phase1.val_macro_f1)
        if best_phase1:
            self.best_phase1 = entry
        best = self.best is None or score > self.best.val_macro_f1
        if best:
            self.best = entry
        stop = patience > 0 and self.stale_epochs >= patience
        self.phase_done = stop or self.phase_epoch >= phase_epochs
        return EpochOutcome(best=best, best_phase1=best_phase1, stop=stop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, blob: dict) -> TrainState:
        bests = {k: Best(**blob[k]) if blob.get(k) else None for k in ("best", "best_phase1", "phase_best")}
        history = [EpochRecord.from_dict(row) for row in blob.get("history", [])]
        return cls(**{**blob, **bests, "history": history})


class WeightEMA:
    """Exponential moving average of a model's weights: parameters and floating-point buffers (BatchNorm
    statistics), as torchvision's reference script averages them. The decay ramps up over the first
    steps, (1 + n) / (10 + n), so that a short run's average is not dominated by its random start."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def reset(self, model) -> None:
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def update(self, model) -> None:
        import torch

        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
                if averaged.dtype.is_floating_point:
                    averaged.lerp_(current.detach(), 1.0 - decay)
                else:
                    averaged.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


@dataclass
class Split:
    """A split as the loop reads it: a map-style dataset whose `__getitems__` returns a whole batch as
    [uint8 images (B, H, W, 3), int64 labels (B,)] (imagecache.ShardDataset), and its labels."""

    dataset: object
    labels: np.ndarray  # int64 (N,)

    @classmethod
    def in_memory(cls, images, labels) -> Split:
        """A split of uint8 images already in memory (benchmarks that time the loop without the cache)."""
        return cls(_TensorImages(images, labels), np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels))


class _TensorImages:
    def __init__(self, images, labels):
        import torch

        self.images, self.labels = images, torch.tensor(labels, dtype=torch.int64)  # a copy: labels may be read-only

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices) -> list:
        import torch

        idx = torch.as_tensor(indices, dtype=torch.int64)
        return [self.images[idx.to(getattr(self.images, "device", "cpu"))], self.labels[idx.to(self.labels.device)]]


class ClassSampler:
    """The epoch's draw of training images for class-balanced sampling or a fixed epoch size: `size` indices
    drawn with probability proportional to (class frequency) ** (power - 1) (with replacement when power < 1; a
    shuffled subset, or the split repeated and shuffled, when power is 1), seeded by (seed, epoch) so a
    resumed epoch draws alike. Rank r takes items r, r + W, ... of the one shared draw, as DistributedSampler
    does, so the ranks' batches of a step make the batch one process would take."""

    def __init__(self, labels, power: float, size: int, seed: int, world: int = 1, rank: int = 0):
        counts = np.bincount(labels)
        self.weights = counts[labels].astype(np.float64) ** (power - 1.0)
        self.power, self.size, self.seed, self.world, self.rank = power, size, seed, world, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.weights)
        if self.power < 1:
            draw = rng.choice(n, size=self.size, replace=True, p=self.weights / self.weights.sum())
        else:
            draw = np.concatenate([rng.permutation(n) for _ in range(-(-self.size // n))])[: self.size]
        return iter(draw[self.rank :: self.world].tolist())


def _batch(batch):
    return batch  # the datasets' __getitems__ return collated batches already


def loader_workers(cfg: TrainConfig, dist: Dist) -> int:
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    return max(0, min(8, (os.cpu_count() or 1) // dist.local_world_size - 1))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import torch

    # numpy's state holds an ndarray; as a list the whole checkpoint loads with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def class_weights(labels: np.ndarray, num_classes: int, power: float = 1.0) -> np.ndarray:
    """Inverse class frequency to the `power` (1 = fully balanced, 0.5 = square root, milder), scaled so
    the average sample weighs 1; classes absent from the labels weigh 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    weights *= counts.sum() / (weights * counts).sum()
    return weights


def log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """log of the class frequencies of `labels`; a class absent from them counts as one image (finite)."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes).astype(np.float64), 1.0)
    return np.log(counts / counts.sum())


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """The per-epoch subset of the shared classification metrics (the same code scores the test split)."""
    m = classification_metrics(y_true, y_pred, classes=classes)
    return {"acc": m["accuracy"], "weighted_f1": m["weighted_f1"], "macro_f1": m["macro_f1"]}


def trainable_modules(model, cfg: TrainConfig, phase: int) -> tuple[str, ...] | None:
    """Dotted names of the modules that learn in `phase` (None = the whole model): the head (the top-level
    module holding the final Linear: ResNet's fc, MobileNet's classifier), and in phase 2 the last
    `finetune_depth` backbone stages."""
    from dermaops.models import head_name, stage_names

    head = head_name(model).split(".")[0]
    if phase == 1:
        return None if cfg.pretrained == "none" else (head,)
    return (head, *(name for stage in stage_names(model)[-cfg.finetune_depth :] for name in stage))


def _learns(name: str, learn: tuple[str, ...] | None) -> bool:
    return learn is None or any(name == m or name.startswith(m + ".") for m in learn)


def make_criterion(cfg: TrainConfig, classes: list[str], labels, device):
    """The training loss: cross-entropy with label smoothing, class weights (cfg.class_weight_power) and, with
    loss_tau > 0, the logit-adjusted loss (the log prior added to the logits, Menon et al. 2021)."""
    import torch

    weights = None
    if cfg.class_weights:
        counts = class_weights(labels, len(classes), cfg.class_weight_power)
        weights = torch.tensor(counts, dtype=torch.float32, device=device)
        log.info("class weights: %s", {c: round(float(w), 3) for c, w in zip(classes, counts, strict=True)})
    ce = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    if cfg.loss_tau <= 0:
        return ce
    prior = cfg.loss_tau * log_prior(np.asarray(labels), len(classes))
    shift = torch.tensor(prior, dtype=torch.float32, device=device)
    return lambda logits, y: ce(logits + shift, y)


class Loaders:
    """The execution side's data: the training loader (the global batch split over the ranks, with its
    sampler) and the validation loader (each rank a strided share), built once for the whole training."""

    def __init__(self, cfg: TrainConfig, train: Split, val: Split, dist: Dist, cuda: bool):
        self.cfg, self.train_split, self.val_split, self.dist, self.cuda = cfg, train, val, dist, cuda
        self.steps_per_epoch = max(1, (cfg.epoch_images or len(train.labels)) // cfg.batch_size)
        self.train, self.sampler = self._train_loader()
        self.val = self._val_loader()

    def _loader_args(self) -> dict:
        in_memory = isinstance(self.train_split.dataset, _TensorImages)  # batches are slices of a resident tensor
        workers = 0 if in_memory else loader_workers(self.cfg, self.dist)
        return {
            "num_workers": workers,
            "collate_fn": _batch,
            "pin_memory": self.cuda and not in_memory,
            # Workers stay between epochs: forking them again costs more than an epoch of a small split.
            "persistent_workers": workers > 0,
            **({"prefetch_factor": 4} if workers > 0 else {}),
        }

    def _train_loader(self):
        """The global batch split over the ranks. The sampler's order for epoch e is randperm(n) seeded by
        (seed, e); rank r takes its items r, r + W, ..., so the ranks' batches of a step together are the
        very batch one process would take, and steps per epoch = n // batch_size at any world size."""
        from torch.utils.data import DataLoader, DistributedSampler

        n, world = len(self.train_split.labels), self.dist.world_size
        dataset = self.train_split.dataset
        global_batch = min(self.cfg.batch_size, n) // world * world
        if global_batch == 0:
            raise StageError(f"{n} training images cannot be shared by {world} training processes")
        if self.cfg.batch_size % world and n >= self.cfg.batch_size:
            raise StageError(
                f"--batch-size {self.cfg.batch_size} is not divisible by the {world} training processes "
                "(it is the global batch, split evenly across them)"
            )
        if self.cfg.sampling_power < 1 or self.cfg.epoch_images is not None:
            sampler = ClassSampler(
                self.train_split.labels, self.cfg.sampling_power, self.steps_per_epoch * global_batch,
                self.cfg.seed * 100_003, world, self.dist.rank,
            )  # fmt: skip
        else:
            sampler = DistributedSampler(
                dataset,
                num_replicas=world,
                rank=self.dist.rank,
                shuffle=True,
                seed=self.cfg.seed * 100_003,
                drop_last=True,
            )
        loader = DataLoader(
            dataset, batch_size=global_batch // world, sampler=sampler, drop_last=True,
            **self._loader_args(),
        )  # fmt: skip
        assert len(loader) == self.steps_per_epoch, (len(loader), self.steps_per_epoch)
        return loader, sampler

    def _val_loader(self):
        from torch.utils.data import DataLoader

        shard = range(self.dist.rank, len(self.val_split.labels), self.dist.world_size)  # see Dist.gather_strided
        return DataLoader(self.val_split.dataset, batch_size=EVAL_BATCH, sampler=shard, **self._loader_args())


class Trainer:
    """The execution part of a training: the model on its device, DDP, the weight average, the loss, the
    epochs and the checkpoints. What to do next (phase, early stop, the best epochs) is TrainState's; the
    loaders are Loaders'."""

    def __init__(
        self,
        cfg: TrainConfig,
        classes: list[str],
        train: Split,
        val: Split,
        device: str,
        work_dir: Path,
        provenance: dict,
        on_saved: Callable[[str, Path], None],
        dist: Dist = SINGLE,
    ):
        import torch

        from dermaops.models import build_model

        self.cfg, self.classes, self.train, self.val = cfg, list(classes), train, val
        self.dist = dist
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.work_dir, self.on_saved = work_dir, on_saved
        frame = Frame(cfg.geometry, cfg.image_size)
        # What every checkpoint of this training carries; the best ones add their epoch, train's fits the rest.
        self.meta = CheckpointMeta.for_model(cfg.arch, classes, frame, cfg.stem, cfg.pretrained, **provenance)
        seed_everything(cfg.seed)
        model = build_model(cfg.arch, len(classes), min(frame.shape), cfg.pretrained, cfg.stem)
        memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.criterion = make_criterion(cfg, classes, train.labels, self.device)
        self.net = self.model  # what the training step calls: DDP over the model when distributed (_sync)
        self.loaders = Loaders(cfg, train, val, dist, self.cuda)
        self.steps_per_epoch = self.loaders.steps_per_epoch
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.policy = PolicyAugment(cfg.auto_augment) if cfg.augment and cfg.auto_augment != "none" else None
        self.state = TrainState()
        self._resume_blob: dict | None = None

    def _sync(self) -> None:
        """Every rank starts the phase from rank 0's weights and average, wrapped for this phase's gradients."""
        self.net = self.model
        gc.collect()  # the previous phase's DDP, whose gradient hooks must be gone before the next one's
        self.net = self.dist.wrap(self.model, self.device)
        if self.ema is not None:
            self.dist.broadcast_module(self.ema.module)

    @property
    def scored_model(self):
        """The weights validation scores and the best checkpoints keep: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # -- state ------------------------------------------------------------------------------
    def resume(self, last: Path, best_files: dict[str, Path]) -> bool:
        """Continue an interrupted training from its `last.pt`; False (and a fresh start) when it belongs to a
        training with other inputs. `best_files` ({"best" | "best_phase1": local copy of cnn.pt |
        cnn_phase1.pt}) may hold a better model than the checkpoint knows: saved by the crashed attempt in
        the epoch it did not finish, it stays the one to beat. The model, weight average and RNG are
        restored here; the optimizer and scheduler when run() rebuilds the phase they belong to."""
        import torch

        blob = torch.load(last, map_location="cpu", weights_only=True)
        # last.pt is the training's state, not a model checkpoint: one of another training (or release) is set
        # aside by its fingerprint alone, never refused.
        if (blob.get("meta") or {}).get("fingerprint") != self.meta.fingerprint:
            log.info("ignoring %s: it belongs to a training with other inputs", last.name)
            return False
        st = self.state = TrainState.from_dict(blob["trainer"])
        self.model.load_state_dict(blob["model_state"])
        if self.ema is not None:
            self.ema.load_state_dict(blob["ema_state"])
        restore_rng(blob["rng"])
        self._resume_blob = {k: blob[k] for k in ("optimizer_state", "scheduler_state")}
        for key, path in best_files.items():
            meta = read_meta(path)
            if meta.epoch > st.epoch:
                setattr(st, key, Best(meta.epoch, meta.phase, meta.val["macro_f1"]))
        log.info(
            "resuming from epoch %d: checkpoint after epoch %d (phase %d), %d history rows kept",
            st.epoch + 1, st.epoch, st.phase, len(st.history),
        )  # fmt: skip
        return True

    def _save_last(self, optimizer, scheduler) -> None:
        import torch

        if not self.dist.primary:
            return  # every rank holds the same state; rank 0 alone writes it
        path = self.work_dir / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "trainer": self.state.to_dict(),
            "meta": self.meta.to_dict(),  # plain types: last.pt loads with weights_only
            "config": asdict(self.cfg),
            "model_state": self.model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "rng": rng_state(),
        }
        if self.ema is not None:
            blob["ema_state"] = self.ema.state_dict()
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        self.on_saved("checkpoints/last.pt", path)

    def _save_best(self, name: str, row: EpochRecord) -> None:
        if not self.dist.primary:
            return
        meta = self.meta.replace(phase=row.phase, epoch=row.epoch, val=row.val())
        path = save_checkpoint(self.work_dir / name, self.scored_model, meta)
        self.on_saved(name, path)

    # -- phases -----------------------------------------------------------------------------
    def configure(self, phase: int):
        """Freeze what `phase` does not train; a fresh AdamW and one-cycle schedule for the phase."""
        import torch

        learn = trainable_modules(self.model, self.cfg, phase)
        for name, p in self.model.named_parameters():
            p.requires_grad_(_learns(name, learn))
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = self.cfg.phase_lr(phase)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=self.steps_per_epoch * self.cfg.phase_epochs(phase), pct_start=0.2
        )
        return learn, optimizer, scheduler

    def _train_mode(self, learn: tuple[str, ...] | None) -> None:
        # Frozen parts stay in eval mode, so their BatchNorm statistics stay those they were trained with.
        self.model.train()
        if learn is None:
            return
        for name, module in self.model.named_modules():
            # Leaves are what train/eval changes (BatchNorm, dropout); a parent may hold learning children.
            if next(module.children(), None) is None and not _learns(name, learn):
                module.eval()

    def run(self) -> TrainState:
        blob, self._resume_blob = self._resume_blob, None
        st = self.state
        for phase in (1, 2):
            n_epochs = self.cfg.phase_epochs(phase)
            if not st.wants(phase, n_epochs):
                continue
            learn, optimizer, scheduler = self.configure(phase)
            if blob is not None and st.phase == phase:
                optimizer.load_state_dict(blob["optimizer_state"])
                scheduler.load_state_dict(blob["scheduler_state"])
            else:
                self._enter_phase(phase)
            self._sync()
            blob = None
            while st.phase_epoch < n_epochs:
                row = self._epoch(phase, learn, optimizer, scheduler)
                if self._after_epoch(row, optimizer, scheduler):
                    break
        return st

    def _enter_phase(self, phase: int) -> None:
        st = self.state
        if phase == 2:
            best1 = self.work_dir / "cnn_phase1.pt"
            if best1.exists():  # on rank 0, which wrote it; _sync hands its weights to the other ranks
                from dermaops.checkpoint import load_checkpoint

                best_model, _ = load_checkpoint(best1)
                self.model.load_state_dict(best_model.state_dict())
                log.info("phase 2 starts from the best phase-1 weights (epoch %s)", st.best_phase1.epoch)
        if self.ema is not None:
            self.ema.reset(self.model)  # a new phase averages from its own starting weights
        st.enter(phase)
        learn = trainable_modules(self.model, self.cfg, phase)
        log.info(
            "phase %d: %d epochs, lr %g, training %s",
            phase,
            self.cfg.phase_epochs(phase),
            self.cfg.phase_lr(phase),
            "the whole network" if learn is None else ", ".join(sorted(learn)),
        )

    def _after_epoch(self, row: EpochRecord, optimizer, scheduler) -> bool:
        """Record the epoch (TrainState.record), write what it made best and the resume checkpoint; True when
        early stopping ends the phase."""
        outcome = self.state.record(row, self.cfg.patience, self.cfg.phase_epochs(row.phase))
        if outcome.best_phase1:
            self._save_best("cnn_phase1.pt", row)
        if outcome.best:
            self._save_best("cnn.pt", row)
        if outcome.stop:
            log.info("early stopping phase %d after epoch %d: no better val macro F1 for %d epochs",
                     row.phase, row.epoch, self.state.stale_epochs)  # fmt: skip
        self._save_last(optimizer, scheduler)
        return outcome.stop

    # -- one epoch ----------------------------------------------------------------------------
    def _remaining_steps(self, phase: int) -> int:
        left = self.cfg.phase_epochs(phase) - self.state.phase_epoch
        if phase == 1:
            left += self.cfg.finetune_epochs
        return left * self.steps_per_epoch

    def train_epoch(self, phase: int, epoch: int, learn, optimizer, scheduler) -> dict:
        """One pass over the training split: train loss and metrics, images/s, seconds."""
        import torch

        cfg = self.cfg
        self.loaders.sampler.set_epoch(epoch)  # the shuffle of epoch e is seeded by (seed, e): resumable
        # Rank 0 draws what a single process would; the others their own stream.
        aug_seed = cfg.seed * 100_019 + epoch + 1_000_003 * self.dist.rank
        aug_rng = torch.Generator(device=self.device).manual_seed(aug_seed)
        mix_rng = np.random.default_rng(aug_seed)
        self._train_mode(learn)
        loss_sum = torch.zeros((), device=self.device)
        preds, targets = [], []
        started = last_log = time.monotonic()
        steps = self.steps_per_epoch
        for step, (images, labels) in enumerate(self.loaders.train):
            images = images.to(self.device, non_blocking=True)
            if self.policy is not None:
                images = self.policy(images, seed=aug_seed * 10_007 + step)
            x = to_float(images)
            if cfg.augment:
                x = augment_batch(x, aug_rng)
            x, lam = mix_batch(x, cfg.mixup_alpha, cfg.cutmix_alpha, mix_rng)
            x = normalize(x, self.meta.mean, self.meta.std, channels_last=self.cuda)
            y = labels.to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                logits = self.net(x)
            logits = logits.float()
            loss = self.criterion(logits, y)
            if lam < 1.0:  # a mixed batch: its labels are y with weight lam and y rolled by one with 1 - lam
                loss = lam * loss + (1.0 - lam) * self.criterion(logits, y.roll(1, 0))
            self._check_finite(loss, phase, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            loss_sum += loss.detach() * len(y)
            preds.append(logits.detach().argmax(1))
            targets.append(y)
            now = time.monotonic()
            if now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                rate = (step + 1) * len(y) * self.dist.world_size / (now - started)
                eta = (now - started) / (step + 1) * (self._remaining_steps(phase) - step - 1)
                log.info("epoch %d (phase %d) step %d/%d: %.0f images/s, ETA %s",
                         epoch, phase, step + 1, steps, rate, _duration(eta))  # fmt: skip
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.monotonic() - started
        # Every rank's share: the loss, predictions and throughput are the whole job's.
        self.dist.all_reduce_sum(loss_sum)
        y_true = self.dist.all_gather_cat(torch.cat(targets)).cpu().numpy()
        y_pred = self.dist.all_gather_cat(torch.cat(preds)).cpu().numpy()
        seen = len(y_true)
        train_m = metrics(y_true, y_pred, self.classes)
        return {
            "train_loss": float(loss_sum.item() / seen),
            **{f"train_{k}": v for k, v in train_m.items()},
            "images_per_s": round(seen / seconds, 1),
            "train_seconds": seconds,
        }

    def _check_finite(self, loss, phase: int, epoch: int, step: int) -> None:
        """Stop at the first non-finite loss: the recipe diverged, and every later step would only train a
        NaN model that looks finished. A user error (exit 2): retrying the same recipe diverges again."""
        import torch

        if bool(torch.isfinite(loss)):
            return
        flag = "--lr" if phase == 1 else "--finetune-lr"
        # Before any update the weights are the initial ones: a non-finite first loss is not the recipe's doing.
        first = " (the very first step: check the initial weights, --pretrained)" if (epoch, step) == (1, 0) else ""
        raise StageError(
            f"training diverged: the loss is {float(loss)} at epoch {epoch} (phase {phase}) step "
            f"{step + 1}/{self.steps_per_epoch}{first}; nothing is published: lower {flag} "
            f"(now {self.cfg.phase_lr(phase):g}) or --weight-decay (now {self.cfg.weight_decay:g})"
        )

    def _epoch(self, phase: int, learn, optimizer, scheduler) -> EpochRecord:
        started, epoch = time.monotonic(), self.state.epoch + 1
        trained = self.train_epoch(phase, epoch, learn, optimizer, scheduler)
        train_seconds = trained.pop("train_seconds")
        val_loss, val_m = self.evaluate(self.scored_model)
        row = EpochRecord(
            phase=phase,
            epoch=epoch,
            **trained,
            val_loss=val_loss,
            **{f"val_{k}": v for k, v in val_m.items()},
            lr=float(optimizer.param_groups[0]["lr"]),
            seconds=round(time.monotonic() - started, 2),
        )
        steps = self.steps_per_epoch
        eta = train_seconds / steps * (self._remaining_steps(phase) - steps)
        log.info(
            "epoch %d (phase %d) done: train loss %.4f acc %.3f | val loss %.4f acc %.3f macro F1 %.3f | "
            "%.0f images/s, %.1f s, ETA %s",
            epoch, phase, row.train_loss, row.train_acc, val_loss, row.val_acc, row.val_macro_f1,
            row.images_per_s, row.seconds, _duration(max(0.0, eta)),
        )  # fmt: skip
        return row

    def evaluate(self, model=None) -> tuple[float, dict]:
        """Plain (unweighted) cross-entropy and metrics of a model (default: the one training) on the validation
        split. Each rank scores its share; the logits are gathered, so every rank computes the same numbers."""
        import torch
        import torch.nn.functional as F

        model = self.model if model is None else model
        model.eval()
        parts = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            for images, _ in self.loaders.val:
                x = normalize(to_float(images.to(self.device)), self.meta.mean, self.meta.std, self.cuda)
                parts.append(model(x).float())
            n = len(self.val.labels)
            empty = torch.empty((0, len(self.classes)), device=self.device)
            logits = self.dist.gather_strided(torch.cat(parts) if parts else empty, n)
            # A copy: the labels are a read-only view of the image cache, which torch warns about on every epoch.
            y = torch.tensor(self.val.labels, device=self.device)
            loss = float(F.cross_entropy(logits, y, reduction="sum")) / n
        return loss, metrics(self.val.labels, logits.argmax(1).cpu().numpy(), self.classes)


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
