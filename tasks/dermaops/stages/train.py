"""Train the skin-lesion CNN (torchvision ResNet) in two phases on a published split.

Phase 1 (--epochs): with pretrained weights (--pretrained imagenet or a file), the backbone is frozen
and only the classifier head learns. With --pretrained none a frozen random backbone would only
give random features, so phase 1 trains the WHOLE network from scratch at --lr instead.
Phase 2 (--finetune-epochs): starts from the best phase-1 weights, unfreezes the last
--finetune-depth residual stages (1 = layer4) and fine-tunes them with the head at --finetune-lr.

Images come from the dataset's image cache (decoded and resized once, see imagecache.py) and are
augmented batch-wise in memory (flips, 90-degree and small rotations, zoom, colour jitter), on the
GPU when there is one. CUDA runs use bf16 autocast and channels_last; CPU runs the same code.
At small sizes (< 40 px, --stem auto) the ResNet stem becomes a 3x3 stride-1 conv without max-pool.

With --calibrate, a post-hoc logit adjustment (bias = -tau * log training prior, the one tau that
maximises val macro F1 on test-time-augmented val predictions) goes into cnn.pt's meta; the Predictor
(dermaops.predictor) applies it wherever the checkpoint is scored. The test split is never looked at.

Always, after training: temperature scaling and the melanoma operating point (dermaops.calibration)
are fitted on the validation probabilities of cnn.pt, scored as evaluate and predict score it (--tta,
the logit adjustment when there is one), and stored in its meta as `temperature` and `mel_threshold`
(the highest threshold on the calibrated p(mel) reaching --mel-sensitivity on validation). Then the
prediction guards (dermaops.guards): the referral threshold for --referral-accuracy and the
out-of-distribution detector (training-split feature statistics, a threshold for --ood-tpr on validation).

Outputs: cnn.pt (best validation macro F1 overall), cnn_phase1.pt (best of phase 1), history.json,
curves_{loss,accuracy,f1}.png, checkpoints/last.pt (written every epoch), manifest.json last.
A re-run after a crash resumes from checkpoints/last.pt ("resuming from epoch N"), with or without
--force: --force only makes a FINISHED training start over (the DAG's force_retrain), so an
orchestrator retry of a forced run still resumes.

Batches come from DataLoader workers reading the image cache's shards, so memory stays flat however
large the split. With --nproc-per-node N > 1 (default: one process per visible GPU) this process checks
the inputs, prefetches the cache and launches N ranks of the same command (dermaops.distributed):
DistributedDataParallel over NCCL on GPUs, gloo on CPU. Rank 0 alone writes checkpoints and outputs
and publishes; the checkpoint holds the global epoch and --batch-size is the global batch, so a run
killed with N processes resumes with any other number.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dermaops import distributed
from dermaops.config import TrainConfig
from dermaops.dataset import CLASSES
from dermaops.errors import StageError
from dermaops.models import imagenet_weights_path
from dermaops.stage import Context, Output, StageIO, fingerprint, read_manifest, skipped
from dermaops.store import S3Uri

HELP = "two-phase ResNet training (frozen backbone/head, then fine-tune the last block); resumable"
CONFIG = TrainConfig
CHECKPOINT = "checkpoints/last.pt"
BEST_FILES = {"best": "cnn.pt", "best_phase1": "cnn_phase1.pt"}  # TrainState field -> file

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The input and output locations; the settings come from CONFIG (dermaops.config.TrainConfig)."""
    parser.add_argument("--split", required=True, help="split output prefix (s3://<b>/runs/<run_id>/split)")
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/models/cnn)")


def _check_locations(stage_io: StageIO, cfg: TrainConfig) -> None:
    """The flags that name things (the range checks of the settings ran in the CLI already)."""
    S3Uri.parse(stage_io.inputs["split"])
    S3Uri.parse(stage_io.out)
    p = cfg.pretrained
    if p == "imagenet":
        imagenet_weights_path(cfg.arch)
    elif p != "none" and not p.startswith("s3://") and not Path(p).is_file():
        raise StageError(f"--pretrained {p!r}: no such file (allowed: none, imagenet, a file path, an s3:// URI)")


def _resume(ctx, out, trainer, work: Path) -> bool:
    """Hand the trainer the checkpoint an interrupted run of the same training left in S3 (if any)."""
    if not ctx.store.exists(out.uri(CHECKPOINT)):
        return False
    last = ctx.store.download(out.uri(CHECKPOINT), work / CHECKPOINT)
    best = {
        key: ctx.store.download(out.uri(name), work / name)
        for key, name in BEST_FILES.items()
        if ctx.store.exists(out.uri(name))
    }
    return trainer.resume(last, best)


def _calibrate(path, val_raw, val_df, train_df, tta: bool, device) -> dict:
    """Fit the logit adjustment of the best checkpoint on the validation split and rewrite the checkpoint with
    it in its meta. Fitted on raw (unadjusted) probabilities, so a resumed run that refits gets the same result.
    `val_raw`: the checkpoint's unadjusted validation probabilities, with test-time augmentation as evaluate
    and predict will score (the shared tta param), so the bias is fitted to the probabilities it adjusts."""
    from dermaops.calibration import fit_logit_adjustment
    from dermaops.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(path, device=device)
    fitted = fit_logit_adjustment(val_raw, val_df["label"].to_numpy(), train_df["label"].to_numpy(), list(CLASSES))
    fitted["logit_adjustment"]["tta"] = tta
    save_checkpoint(path, model, meta.replace(**fitted))
    log.info("logit adjustment fitted on val: %s", fitted["logit_adjustment"])
    return fitted["logit_adjustment"]


@dataclass
class Inputs:
    split_uri: S3Uri
    out: Output
    done: dict | None  # the manifest of a finished training with the same inputs
    train_df: object
    val_df: object
    dataset: object
    cache: object  # imagecache.CachedImages


def _inputs(stage_io: StageIO, cfg: TrainConfig, ctx, cache_ctx) -> Inputs:
    """Everything the training reads, checked; the image cache's shards of both splits in cache_ctx's scratch."""
    from dermaops.dataset import Dataset
    from dermaops.frame import Frame
    from dermaops.imagecache import load_images
    from dermaops.split_files import read_split_csv

    split_uri = S3Uri.parse(stage_io.inputs["split"])
    split_manifest = read_manifest(ctx.store, split_uri, "split")
    if cfg.pretrained.startswith("s3://") and not ctx.store.exists(cfg.pretrained):
        raise StageError(f"--pretrained {cfg.pretrained}: no such object")
    fp = fingerprint(
        split=stage_io.inputs["split"], split_fingerprint=split_manifest.get("fingerprint"), **cfg.fingerprint_inputs()
    )
    out = ctx.output(stage_io.out, "train", fp)
    done = out.finished()
    if done and not stage_io.force:
        return Inputs(split_uri, out, done, None, None, None, None)
    train_df = read_split_csv(ctx.store, split_uri, "train", split_manifest)
    val_df = read_split_csv(ctx.store, split_uri, "val", split_manifest)
    if cfg.max_train_images is not None and len(train_df) > cfg.max_train_images:
        train_df = train_df.sample(n=cfg.max_train_images, random_state=cfg.seed).sort_index()
    dataset = Dataset.open(ctx.store, split_manifest["summary"]["dataset_uri"], ctx.scratch)
    cache = load_images(cache_ctx, dataset, Frame(cfg.geometry, cfg.image_size))
    cache.positions([*train_df["image_id"], *val_df["image_id"]])  # fetches (and verifies) their shards
    return Inputs(split_uri, out, done, train_df, val_df, dataset, cache)


def _launch(stage_io: StageIO, cfg: TrainConfig, ctx, device: str, nproc: int) -> dict:
    """Check the inputs and fill the cache here, once, then run the training as `nproc` ranks."""
    if device == "cuda" and nproc > (gpus := distributed.visible_gpus()):
        raise StageError(f"--nproc-per-node {nproc}: only {gpus} GPUs are visible (one process per GPU)")
    if cfg.batch_size % nproc:
        raise StageError(
            f"--batch-size {cfg.batch_size} is not divisible by --nproc-per-node {nproc} "
            "(it is the global batch, split evenly across the processes)"
        )
    inputs = _inputs(stage_io, cfg, ctx, ctx)
    if inputs.done and not stage_io.force:
        log.info("finished training with the same inputs at %s: skipping (use --force to retrain)", inputs.out.prefix)
        return skipped(inputs.done)
    summary = distributed.launch(stage_io.argv, nproc, ctx.scratch)
    return {key: value for key, value in summary.items() if key not in ("stage", "status", "seconds")}


def run(stage_io: StageIO, cfg: TrainConfig, ctx: Context) -> dict:
    _check_locations(stage_io, cfg)
    from dermaops.models import pick_device

    started = time.monotonic()
    device = pick_device(cfg.device)
    dist = distributed.from_env()
    if dist is None:
        nproc = cfg.nproc_per_node or distributed.visible_gpus() or 1
        if nproc > 1:
            return _launch(stage_io, cfg, ctx, device, nproc)
        dist = distributed.SINGLE
    try:
        return _train(stage_io, cfg, ctx, dist, device, started)
    except StageError as exc:
        distributed.report_error(exc)
        raise
    finally:
        distributed.shutdown(dist)


def _train(stage_io: StageIO, cfg: TrainConfig, ctx, dist, device: str, started: float) -> dict:
    """One rank's training, as named steps: inputs, fit, post-hoc fits on validation, publish."""
    device = distributed.device_for(dist, device)
    distributed.init(dist, device)
    inputs = _inputs(stage_io, cfg, ctx, Context(ctx.store, distributed.cache_scratch(ctx.scratch)))
    if inputs.done and not stage_io.force:
        log.info("finished training with the same inputs at %s: skipping (use --force to retrain)", inputs.out.prefix)
        return skipped(inputs.done)
    fitted = _fit(cfg, ctx, inputs, dist, device)
    if not dist.primary:
        return {"rank": dist.rank, "epochs_run": len(fitted.state.history)}
    post_hoc = _fit_post_hoc(cfg, inputs, fitted.work / "cnn.pt", device)
    summary = _publish(stage_io, cfg, inputs, fitted, post_hoc, dist, device, started)
    distributed.report_summary(summary)
    return summary


@dataclass
class Fitted:
    trainer: object  # training.Trainer
    state: object  # training.TrainState: the history and the best epochs
    work: Path  # the local folder of the checkpoints
    resumed: bool
    upload: object  # (name, path) -> None: rank 0 puts a file into the output prefix


def _set_threads(cfg: TrainConfig, dist, device: str) -> None:
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    elif dist.distributed and not device.startswith("cuda"):
        # CPU ranks share the host's cores (torchrun sets OMP_NUM_THREADS=1 for the same reason).
        torch.set_num_threads(max(1, torch.get_num_threads() // dist.local_world_size))


def _fit(cfg: TrainConfig, ctx, inputs: Inputs, dist, device: str) -> Fitted:
    """The two training phases (dermaops.training.Trainer), resumed from the checkpoint an interrupted run of
    the same training left in S3; every rank runs it, rank 0 alone writes the output prefix."""
    from dermaops.imagecache import cache_uri
    from dermaops.training import Split, Trainer

    _set_threads(cfg, dist, device)
    out, cache = inputs.out, inputs.cache

    def to_split(frame) -> Split:
        labels = frame["label"].to_numpy()
        return Split(cache.dataset(frame["image_id"].tolist(), labels), labels)

    # Local files of an earlier attempt are never trusted: a resume takes its state from S3 alone.
    work = ctx.scratch / "train" / out.fingerprint[:16]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def upload(name, path):
        if dist.primary:  # the Trainer saves on rank 0 only; this keeps the one writer explicit
            out.put_file(name, path, content_type="application/octet-stream")

    provenance = {  # the CheckpointMeta fields saying where the training data came from
        "dataset_version": inputs.dataset.version,
        "split_uri": str(inputs.split_uri),
        "image_cache": str(cache_uri(inputs.dataset, cache.frame)),
        "fingerprint": out.fingerprint,
    }
    trainer = Trainer(
        cfg, list(CLASSES), to_split(inputs.train_df), to_split(inputs.val_df), device, work, provenance, upload, dist
    )
    # Inputs are all good: from here on the output prefix changes (rank 0 alone writes it).
    if dist.primary:
        out.unpublish()
        if inputs.done:  # --force on a finished training starts over instead of resuming the finished one.
            for name in (CHECKPOINT, *BEST_FILES.values()):
                if ctx.store.exists(out.uri(name)):
                    ctx.store.delete(out.uri(name))
    dist.barrier()  # no rank reads a checkpoint that rank 0 is about to delete
    resumed = _resume(ctx, out, trainer, work)
    log.info(
        "training %s at %s (stem %s) on %s%s: %d train / %d val images, %d steps per epoch",
        cfg.arch, cache.frame.describe(), trainer.meta.stem, device,
        f" x {dist.world_size} processes" if dist.distributed else "", len(inputs.train_df), len(inputs.val_df),
        trainer.steps_per_epoch,
    )  # fmt: skip
    state = trainer.run()
    dist.barrier()
    distributed.shutdown(dist)
    return Fitted(trainer, state, work, resumed, upload)


def _fit_post_hoc(cfg: TrainConfig, inputs: Inputs, path: Path, device: str) -> dict:
    """What is fitted on validation after training, each stored in the best checkpoint's meta for every
    consumer, in the order the Predictor (dermaops.predictor) applies them: the logit adjustment (with --calibrate), the
    temperature and the melanoma threshold, then the prediction guards (referral and out-of-distribution
    thresholds, the detector's statistics from the training split)."""
    from dermaops.calibration import calibrate_checkpoint
    from dermaops.guards import fit_checkpoint
    from dermaops.predictor import Predictor

    train_df, val_df, cache = inputs.train_df, inputs.val_df, inputs.cache
    val_images = cache.rows(val_df["image_id"].tolist())
    val_labels = val_df["label"].to_numpy()
    # The best checkpoint's unadjusted validation probabilities, scored once: the logit adjustment, the
    # calibration and the referral threshold are each fitted on a transform of them, and with test-time
    # augmentation a pass costs a forward per view.
    best = Predictor.load(path, device)
    val_raw = best.softmax(val_images, tta=cfg.tta)
    del best
    adjustment = _calibrate(path, val_raw, val_df, train_df, cfg.tta, device) if cfg.calibrate else None
    calibration = calibrate_checkpoint(
        path, val_images, val_labels, cfg.mel_sensitivity, cfg.tta, device, val_raw=val_raw
    )
    log.info("calibrated on val: temperature %.4f, mel_threshold %.4f, %s",
             calibration["temperature"], calibration["mel_threshold"], calibration["calibration"])  # fmt: skip
    guards = fit_checkpoint(
        path,
        cache.rows,
        train_df["image_id"].tolist(),
        train_df["label"].to_numpy(),
        val_images,
        val_labels,
        referral_accuracy=cfg.referral_accuracy,
        ood_tpr=cfg.ood_tpr,
        tta=cfg.tta,
        device=device,
        val_raw=val_raw,
    )
    return {"adjustment": adjustment, "calibration": calibration, "guards": guards}


def _publish(
    stage_io: StageIO, cfg: TrainConfig, inputs: Inputs, fitted: Fitted, post_hoc: dict, dist, device, started
) -> dict:
    """The checkpoints, the history and its curves, then the manifest with the summary (the stage contract)."""
    import numpy as np

    from dermaops.plots import plot_history

    out, work, state = inputs.out, fitted.work, fitted.state
    fitted.upload("cnn.pt", work / "cnn.pt")
    history = [row.to_dict() for row in state.history]
    out.put_json("history.json", history)
    for name, path in plot_history(history, work / "curves").items():
        out.put_file(name, path, content_type="image/png")
    for name in (*BEST_FILES.values(), CHECKPOINT):  # uploaded while training (maybe by the crashed attempt)
        if name not in out.files and (work / name).exists():
            fitted.upload(name, work / name)
    best, calibration, guards = state.best, post_hoc["calibration"], post_hoc["guards"]
    summary = {
        "model_uri": str(out.uri("cnn.pt")),
        "phase1_model_uri": str(out.uri("cnn_phase1.pt")) if state.best_phase1 else None,
        "history_uri": str(out.uri("history.json")),
        "best_val_macro_f1": round(best.val_macro_f1, 4),
        "best_epoch": best.epoch,
        "best_phase": best.phase,
        "epochs_run": len(history),
        "arch": cfg.arch,
        "image_size": cfg.image_size,
        "geometry": cfg.geometry,
        "stem": fitted.trainer.meta.stem,
        "device": device.split(":")[0],
        "world_size": dist.world_size,
        "images_per_s": round(float(np.median([r["images_per_s"] for r in history])), 1),
        "resumed": fitted.resumed,
        "logit_adjustment": post_hoc["adjustment"],
        "temperature": round(calibration["temperature"], 4),
        "mel_threshold": round(calibration["mel_threshold"], 4),
        "calibration": calibration["calibration"],
        "referral": guards["referral"],
        "ood": guards["ood"],
        "n_train": len(inputs.train_df),
        "n_val": len(inputs.val_df),
        "dataset_version": inputs.dataset.version,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    out.publish(
        summary,
        split_uri=str(inputs.split_uri),
        config={"split": stage_io.inputs["split"], "out": stage_io.out, **asdict(cfg)},
    )
    return summary
