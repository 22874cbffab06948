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

Outputs: cnn.pt (best validation macro F1 overall), cnn_phase1.pt (best of phase 1), history.json,
curves_{loss,accuracy,f1}.png, checkpoints/last.pt (written every epoch), manifest.json last.
A re-run after a crash resumes from checkpoints/last.pt ("resuming from epoch N"), with or without
--force: --force only makes a FINISHED training start over (the DAG's force_retrain), so an
orchestrator retry of a forced run still resumes.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import time

from dermaops.dataset import CLASSES
from dermaops.errors import StageError
from dermaops.models import ARCHS, STEMS, imagenet_weights_path
from dermaops.stage import fingerprint, read_manifest, read_verified, skipped
from dermaops.store import S3Uri

HELP = "two-phase ResNet training (frozen backbone/head, then fine-tune the last block); resumable"
CHECKPOINT = "checkpoints/last.pt"
BEST_FILES = ("cnn.pt", "cnn_phase1.pt")

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", required=True, help="split output prefix (s3://<b>/runs/<run_id>/split)")
    parser.add_argument("--out", required=True, help="output prefix (s3://<b>/runs/<run_id>/models/cnn)")
    parser.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision ResNet backbone")
    parser.add_argument(
        "--pretrained",
        default="none",
        help="initial weights: none, imagenet (torchvision weights, must be in the torch hub cache), "
        "or a local path / s3:// URI to a state_dict or DermaOps checkpoint",
    )
    parser.add_argument("--image-size", type=int, default=64, help="square input size in px (the cache resizes)")
    parser.add_argument(
        "--stem", choices=STEMS, default="auto", help="ResNet stem: auto = small (3x3, no max-pool) below 40 px"
    )
    parser.add_argument("--epochs", type=int, default=20, help="phase-1 epochs")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="phase-2 (fine-tuning) epochs")
    parser.add_argument("--finetune-depth", type=int, default=1, help="residual stages unfrozen in phase 2 (1-4)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="phase-1 peak learning rate (AdamW, one-cycle)")
    parser.add_argument("--finetune-lr", type=float, default=1e-5, help="phase-2 peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    parser.add_argument(
        "--class-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="weight the loss by inverse class frequency of the training split",
    )
    parser.add_argument(
        "--class-weight-power",
        type=float,
        default=1.0,
        help="class weight = (inverse frequency) ** power: 1 balances classes fully, 0.5 is milder",
    )
    parser.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=True, help="augment training batches"
    )
    parser.add_argument(
        "--patience", type=int, default=5, help="early stopping: epochs without a better val macro F1 (0 = off)"
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after training, fit a logit adjustment (bias = -tau * log train prior, one tau maximising val "
        "macro F1 on test-time-augmented val predictions) and store it in cnn.pt's meta; every predict_proba "
        "of that checkpoint applies it",
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed (init, shuffling, augmentation)")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    parser.add_argument(
        "--max-train-images",
        type=int,
        default=None,
        help="use a seeded random subset of at most this many training images (tests, benchmarks)",
    )


def _check_args(args) -> None:
    """Every flag checked before anything is read or written."""
    bounds = [
        ("--epochs", args.epochs, 0),
        ("--finetune-epochs", args.finetune_epochs, 0),
        ("--batch-size", args.batch_size, 1),
        ("--patience", args.patience, 0),
        ("--num-threads", args.num_threads, 0),
    ]
    for flag, value, low in bounds:
        if value < low:
            raise StageError(f"{flag} must be >= {low}, got {value}")
    if args.epochs + args.finetune_epochs == 0:
        raise StageError("--epochs and --finetune-epochs are both 0: nothing to train")
    if not 1 <= args.finetune_depth <= 4:
        raise StageError(f"--finetune-depth must be 1..4 (residual stages from the end), got {args.finetune_depth}")
    if not 8 <= args.image_size <= 1024:
        raise StageError(f"--image-size must be 8..1024 px, got {args.image_size}")
    for flag, value in (("--lr", args.lr), ("--finetune-lr", args.finetune_lr)):
        if not value > 0:
            raise StageError(f"{flag} must be > 0, got {value}")
    if args.weight_decay < 0:
        raise StageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.label_smoothing < 1:
        raise StageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if not 0 <= args.class_weight_power <= 2:
        raise StageError(f"--class-weight-power must be in [0, 2], got {args.class_weight_power}")
    if args.max_train_images is not None and args.max_train_images < 2:
        raise StageError(f"--max-train-images must be >= 2, got {args.max_train_images}")
    S3Uri.parse(args.split)
    S3Uri.parse(args.out)
    p = args.pretrained
    if p == "imagenet":
        imagenet_weights_path(args.arch)
    elif p != "none" and not p.startswith("s3://"):
        from pathlib import Path

        if not Path(p).is_file():
            raise StageError(f"--pretrained {p!r}: no such file (allowed: none, imagenet, a file path, an s3:// URI)")


def _read_split_csv(store, split_uri: S3Uri, name: str, manifest: dict | None = None):
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(read_verified(store, split_uri, name, manifest)))
    missing = [c for c in ("image_id", "dx", "label") if c not in frame.columns]
    if missing:
        raise StageError(f"{split_uri.join(name)} lacks columns {missing}")
    expected = frame["dx"].map({c: i for i, c in enumerate(CLASSES)})
    bad = frame[expected != frame["label"]]
    if len(bad):
        raise StageError(
            f"{split_uri.join(name)}: label does not match dx for {len(bad)} rows "
            f"(first: {bad['image_id'].iloc[0]} dx={bad['dx'].iloc[0]} label={bad['label'].iloc[0]})"
        )
    if frame.empty:
        raise StageError(f"{split_uri.join(name)} has no rows")
    return frame


def _fingerprint(args, split_manifest: dict) -> str:
    params = {
        k: getattr(args, k)
        for k in (
            "arch pretrained image_size stem epochs finetune_epochs finetune_depth batch_size lr finetune_lr "
            "weight_decay label_smoothing class_weights class_weight_power augment patience seed max_train_images "
            "calibrate"
        ).split()
    }
    return fingerprint(split=args.split, split_fingerprint=split_manifest.get("fingerprint"), **params)


def _resume(ctx, out, trainer, work) -> bool:
    """Load checkpoints/last.pt (and the best models so far) if an interrupted run of the same training left them."""
    import torch

    if not ctx.store.exists(out.uri(CHECKPOINT)):
        return False
    path = ctx.store.download(out.uri(CHECKPOINT), work / CHECKPOINT)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("meta", {}).get("fingerprint") != out.fingerprint:
        log.info("ignoring %s: it belongs to a training with other inputs", out.uri(CHECKPOINT))
        return False
    trainer.restore(blob)
    st = trainer.state
    for name, key in zip(BEST_FILES, ("best", "best_phase1"), strict=True):
        if not ctx.store.exists(out.uri(name)):
            continue
        meta = torch.load(ctx.store.download(out.uri(name), work / name), map_location="cpu", weights_only=True)["meta"]
        if meta["epoch"] > st["epoch"]:
            # Saved by the crashed attempt in the epoch it did not finish: a genuinely better model
            # than the checkpoint's best, so it stays the one to beat.
            st[key] = {"epoch": meta["epoch"], "phase": meta["phase"], "val_macro_f1": meta["val"]["macro_f1"]}
    log.info(
        "resuming from epoch %d: checkpoint after epoch %d (phase %d), %d history rows kept",
        st["epoch"] + 1, st["epoch"], st["phase"], len(st["history"]),
    )  # fmt: skip
    return True


def _calibrate(path, val_images, val_df, train_df, device) -> dict:
    """Fit the logit adjustment of the best checkpoint on the validation split and rewrite the checkpoint with
    it in its meta. Fitted on raw (unadjusted) probabilities, so a resumed run that refits gets the same result."""
    from dermaops.models import load_checkpoint, predict_proba, save_checkpoint
    from dermaops.training import fit_logit_adjustment

    model, meta = load_checkpoint(path, device=device)
    # Test-time augmentation on, as evaluate scores by default: the bias is fitted to the probabilities it adjusts.
    proba = predict_proba(model, val_images, meta, device=device, tta=True, adjust=False)
    fitted = fit_logit_adjustment(proba, val_df["label"].to_numpy(), train_df["label"].to_numpy(), list(CLASSES))
    fitted["logit_adjustment"]["tta"] = True
    save_checkpoint(path, model, {**meta, **fitted})
    log.info("logit adjustment fitted on val: %s", fitted["logit_adjustment"])
    return fitted["logit_adjustment"]


def run(args, ctx) -> dict:
    _check_args(args)
    import numpy as np
    import torch

    from dermaops.dataset import Dataset
    from dermaops.imagecache import cache_uri, load_images
    from dermaops.models import pick_device
    from dermaops.plots import plot_history
    from dermaops.training import Split, TrainConfig, Trainer

    started = time.monotonic()
    split_uri = S3Uri.parse(args.split)
    split_manifest = read_manifest(ctx.store, split_uri, "split")
    if args.pretrained.startswith("s3://") and not ctx.store.exists(args.pretrained):
        raise StageError(f"--pretrained {args.pretrained}: no such object")
    device = pick_device(args.device)
    out = ctx.output(args.out, "train", _fingerprint(args, split_manifest))
    done = out.finished()
    if done and not args.force:
        log.info("finished training with the same inputs at %s: skipping (use --force to retrain)", out.prefix)
        return skipped(done)

    train_df = _read_split_csv(ctx.store, split_uri, "train.csv", split_manifest)
    val_df = _read_split_csv(ctx.store, split_uri, "val.csv", split_manifest)
    if args.max_train_images is not None and len(train_df) > args.max_train_images:
        train_df = train_df.sample(n=args.max_train_images, random_state=args.seed).sort_index()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    dataset_uri = split_manifest["summary"]["dataset_uri"]
    dataset = Dataset.open(ctx.store, dataset_uri, ctx.scratch)
    cache = load_images(ctx, dataset, args.image_size)

    def to_split(frame) -> Split:
        images = torch.from_numpy(cache.rows(frame["image_id"].tolist())).to(device)
        labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.int64, device=device)
        return Split(images, labels)

    cfg = TrainConfig(
        arch=args.arch,
        image_size=args.image_size,
        stem=args.stem,
        pretrained=args.pretrained,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        finetune_depth=args.finetune_depth,
        batch_size=args.batch_size,
        lr=args.lr,
        finetune_lr=args.finetune_lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        class_weights=args.class_weights,
        patience=args.patience,
        seed=args.seed,
        augment=args.augment,
        class_weight_power=args.class_weight_power,
    )
    # Local files of an earlier attempt are never trusted: a resume takes its state from S3 alone.
    work = ctx.scratch / "train" / out.fingerprint[:16]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def upload(name, path):
        out.put_file(name, path, content_type="application/octet-stream")

    extra_meta = {
        "dataset_version": dataset.version,
        "split_uri": str(split_uri),
        "image_cache": str(cache_uri(dataset, args.image_size)),
        "fingerprint": out.fingerprint,
    }
    trainer = Trainer(cfg, list(CLASSES), to_split(train_df), to_split(val_df), device, work, extra_meta, upload)

    # Inputs are all good: from here on the output prefix changes.
    out.unpublish()
    if done:  # --force on a finished training starts over instead of resuming the finished one.
        for name in (CHECKPOINT, *BEST_FILES):
            if ctx.store.exists(out.uri(name)):
                ctx.store.delete(out.uri(name))
    resumed = _resume(ctx, out, trainer, work)
    log.info(
        "training %s at %d px (stem %s) on %s: %d train / %d val images, %d steps per epoch",
        args.arch, args.image_size, trainer.meta["stem"], device, len(train_df), len(val_df), trainer.steps_per_epoch,
    )  # fmt: skip
    state = trainer.run()

    adjustment = None
    if args.calibrate:
        adjustment = _calibrate(work / "cnn.pt", cache.rows(val_df["image_id"].tolist()), val_df, train_df, device)
        upload("cnn.pt", work / "cnn.pt")
    history = state["history"]
    out.put_json("history.json", history)
    for name, path in plot_history(history, work / "curves").items():
        out.put_file(name, path, content_type="image/png")
    for name in (*BEST_FILES, CHECKPOINT):  # uploaded while training (maybe by the crashed attempt)
        if name not in out.files and (work / name).exists():
            upload(name, work / name)
    best = state["best"]
    summary = {
        "model_uri": str(out.uri("cnn.pt")),
        "phase1_model_uri": str(out.uri("cnn_phase1.pt")) if state["best_phase1"] else None,
        "history_uri": str(out.uri("history.json")),
        "best_val_macro_f1": round(best["val_macro_f1"], 4),
        "best_epoch": best["epoch"],
        "best_phase": best["phase"],
        "epochs_run": len(history),
        "arch": args.arch,
        "image_size": args.image_size,
        "stem": trainer.meta["stem"],
        "device": device,
        "images_per_s": round(float(np.median([r["images_per_s"] for r in history])), 1),
        "resumed": resumed,
        "logit_adjustment": adjustment,
        "n_train": len(train_df),
        "n_val": len(val_df),
        "dataset_version": dataset.version,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    out.publish(summary, split_uri=str(split_uri), config=vars(args))
    return summary
