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
maximises val macro F1 on test-time-augmented val predictions) goes into cnn.pt's meta; predict_proba
applies it wherever the checkpoint is scored. The test split is never looked at.

Always, after training: temperature scaling and the melanoma operating point (dermaops.calibration)
are fitted on the validation probabilities of cnn.pt, scored as evaluate and predict score it (--tta,
the logit adjustment when there is one), and stored in its meta as `temperature` and `mel_threshold`
(the highest threshold on the calibrated p(mel) reaching --mel-sensitivity on validation).

Outputs: cnn.pt (best validation macro F1 overall), cnn_phase1.pt (best of phase 1), history.json,
curves_{loss,accuracy,f1}.png, checkpoints/last.pt (written every epoch), manifest.json last.
A re-run after a crash resumes from checkpoints/last.pt ("resuming from epoch N"), with or without
--force: --force only makes a FINISHED training start over (the DAG's force_retrain), so an
orchestrator retry of a forced run still resumes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from dermaops.config import TrainConfig
from dermaops.dataset import CLASSES
from dermaops.errors import StageError
from dermaops.models import imagenet_weights_path
from dermaops.stage import fingerprint, read_manifest, skipped
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


def _check_locations(args, cfg: TrainConfig) -> None:
    """The flags that name things (the range checks of the settings ran in the CLI already)."""
    S3Uri.parse(args.split)
    S3Uri.parse(args.out)
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


def _calibrate(path, val_images, val_df, train_df, tta: bool, device) -> dict:
    """Fit the logit adjustment of the best checkpoint on the validation split and rewrite the checkpoint with
    it in its meta. Fitted on raw (unadjusted) probabilities, so a resumed run that refits gets the same result."""
    from dermaops.models import load_checkpoint, predict_proba, save_checkpoint
    from dermaops.training import fit_logit_adjustment

    model, meta = load_checkpoint(path, device=device)
    # Test-time augmentation as evaluate and predict will score (the shared tta param): the bias is fitted
    # to the probabilities it adjusts.
    proba = predict_proba(model, val_images, meta, device=device, tta=tta, adjust=False)
    fitted = fit_logit_adjustment(proba, val_df["label"].to_numpy(), train_df["label"].to_numpy(), list(CLASSES))
    fitted["logit_adjustment"]["tta"] = tta
    save_checkpoint(path, model, {**meta, **fitted})
    log.info("logit adjustment fitted on val: %s", fitted["logit_adjustment"])
    return fitted["logit_adjustment"]


def run(args, ctx) -> dict:
    cfg: TrainConfig = args.config
    _check_locations(args, cfg)
    import numpy as np
    import torch

    from dermaops.dataset import Dataset
    from dermaops.imagecache import cache_uri, load_images
    from dermaops.models import pick_device
    from dermaops.plots import plot_history
    from dermaops.split_files import read_split_csv
    from dermaops.training import Split, Trainer

    started = time.monotonic()
    split_uri = S3Uri.parse(args.split)
    split_manifest = read_manifest(ctx.store, split_uri, "split")
    if cfg.pretrained.startswith("s3://") and not ctx.store.exists(cfg.pretrained):
        raise StageError(f"--pretrained {cfg.pretrained}: no such object")
    device = pick_device(cfg.device)
    fp = fingerprint(split=args.split, split_fingerprint=split_manifest.get("fingerprint"), **cfg.fingerprint_inputs())
    out = ctx.output(args.out, "train", fp)
    done = out.finished()
    if done and not args.force:
        log.info("finished training with the same inputs at %s: skipping (use --force to retrain)", out.prefix)
        return skipped(done)

    train_df = read_split_csv(ctx.store, split_uri, "train", split_manifest)
    val_df = read_split_csv(ctx.store, split_uri, "val", split_manifest)
    if cfg.max_train_images is not None and len(train_df) > cfg.max_train_images:
        train_df = train_df.sample(n=cfg.max_train_images, random_state=cfg.seed).sort_index()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    dataset_uri = split_manifest["summary"]["dataset_uri"]
    dataset = Dataset.open(ctx.store, dataset_uri, ctx.scratch)
    cache = load_images(ctx, dataset, cfg.image_size)

    def to_split(frame) -> Split:
        images = torch.from_numpy(cache.rows(frame["image_id"].tolist())).to(device)
        labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.int64, device=device)
        return Split(images, labels)

    # Local files of an earlier attempt are never trusted: a resume takes its state from S3 alone.
    work = ctx.scratch / "train" / out.fingerprint[:16]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def upload(name, path):
        out.put_file(name, path, content_type="application/octet-stream")

    extra_meta = {
        "dataset_version": dataset.version,
        "split_uri": str(split_uri),
        "image_cache": str(cache_uri(dataset, cfg.image_size)),
        "fingerprint": out.fingerprint,
    }
    trainer = Trainer(cfg, list(CLASSES), to_split(train_df), to_split(val_df), device, work, extra_meta, upload)

    # Inputs are all good: from here on the output prefix changes.
    out.unpublish()
    if done:  # --force on a finished training starts over instead of resuming the finished one.
        for name in (CHECKPOINT, *BEST_FILES.values()):
            if ctx.store.exists(out.uri(name)):
                ctx.store.delete(out.uri(name))
    resumed = _resume(ctx, out, trainer, work)
    log.info(
        "training %s at %d px (stem %s) on %s: %d train / %d val images, %d steps per epoch",
        cfg.arch, cfg.image_size, trainer.meta["stem"], device, len(train_df), len(val_df), trainer.steps_per_epoch,
    )  # fmt: skip
    state = trainer.run()

    adjustment = None
    val_images = cache.rows(val_df["image_id"].tolist())
    if cfg.calibrate:
        adjustment = _calibrate(work / "cnn.pt", val_images, val_df, train_df, cfg.tta, device)
    # Calibration hook (dermaops.calibration): temperature and melanoma threshold, fitted on validation
    # after any logit adjustment, stored in cnn.pt's meta for every consumer.
    from dermaops.calibration import calibrate_checkpoint

    calibration = calibrate_checkpoint(
        work / "cnn.pt", val_images, val_df["label"].to_numpy(), cfg.mel_sensitivity, cfg.tta, device
    )
    log.info("calibrated on val: temperature %.4f, mel_threshold %.4f, %s",
             calibration["temperature"], calibration["mel_threshold"], calibration["calibration"])  # fmt: skip
    upload("cnn.pt", work / "cnn.pt")
    history = state.history
    out.put_json("history.json", history)
    for name, path in plot_history(history, work / "curves").items():
        out.put_file(name, path, content_type="image/png")
    for name in (*BEST_FILES.values(), CHECKPOINT):  # uploaded while training (maybe by the crashed attempt)
        if name not in out.files and (work / name).exists():
            upload(name, work / name)
    best = state.best
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
        "stem": trainer.meta["stem"],
        "device": device,
        "images_per_s": round(float(np.median([r["images_per_s"] for r in history])), 1),
        "resumed": resumed,
        "logit_adjustment": adjustment,
        "temperature": round(calibration["temperature"], 4),
        "mel_threshold": round(calibration["mel_threshold"], 4),
        "calibration": calibration["calibration"],
        "n_train": len(train_df),
        "n_val": len(val_df),
        "dataset_version": dataset.version,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    out.publish(summary, split_uri=str(split_uri), config={"split": args.split, "out": args.out, **asdict(cfg)})
    return summary
