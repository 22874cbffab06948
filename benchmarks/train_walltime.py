"""Two-phase training wall time on the real 28 px pack, with and without the image cache; prints JSON.

Three measurements of the same training (same flags, full lesion-grouped split of all 10,015 images):
  cache_cold   the real `train` stage as a subprocess on a dataset whose cache does not exist yet:
               it decodes every image once, publishes cache/<size>/, then trains;
  cache_warm   the real `train` stage again (--force, empty scratch): downloads the published cache;
  no_cache     what training costs WITHOUT a cache: the same Trainer, in this process, fed by a
               benchmark-only image source that decodes and resizes each batch's JPEGs (PIL, as the
               cache does) every time a batch is drawn, i.e. every epoch. This path exists only here.
               Its time covers training only (no process start, no S3 uploads of checkpoints), so it
               is, if anything, flattered against the two stage runs.

    python benchmarks/train_walltime.py                            # recipe at 48 px, 2 + 1 epochs
    python benchmarks/train_walltime.py --epochs 8 --finetune-epochs 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT.parent / "shared" / "data" / "ham10000-28px"


class JpegBatches:
    """Indexable like a uint8 image tensor, but decodes the JPEGs of every batch it is asked for."""

    def __init__(self, jpegs: list[bytes], size: int):
        self.jpegs, self.size = jpegs, size

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, idx):
        import numpy as np
        import torch
        from dermaops.imagecache import decode_image

        rows = range(len(self.jpegs))[idx] if isinstance(idx, slice) else idx.tolist()
        batch = np.stack([decode_image(self.jpegs[i], self.size) for i in rows])
        return torch.from_numpy(batch)


def stage(env: dict, *argv: str) -> tuple[dict, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dermaops", *argv], env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train_walltime: stage {argv[0]} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), round(time.monotonic() - started, 1)


def no_cache_training(pack: Path, split_frames: dict, args) -> float:
    import torch
    from dermaops.dataset import ARCHIVES, CLASSES
    from dermaops.training import Split, TrainConfig, Trainer

    jpegs = {}
    for archive in ARCHIVES:  # raw bytes in memory: the cost measured is decoding, not disk reads
        with zipfile.ZipFile(pack / archive) as zf:
            for name in zf.namelist():
                jpegs[name.rsplit(".", 1)[0]] = zf.read(name)

    def split(frame) -> Split:
        images = JpegBatches([jpegs[i] for i in frame["image_id"]], args.image_size)
        return Split.in_memory(images, torch.tensor(frame["label"].to_numpy(), dtype=torch.int64))

    cfg = TrainConfig(
        arch=args.arch, image_size=args.image_size, stem="auto", pretrained="none", epochs=args.epochs,
        finetune_epochs=args.finetune_epochs, finetune_depth=2, batch_size=args.batch_size, lr=3e-3,
        finetune_lr=3e-4, weight_decay=5e-4, label_smoothing=0.1, class_weights=True, patience=0, seed=42,
        class_weight_power=0.5,
    )  # fmt: skip
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(
            cfg, list(CLASSES), split(split_frames["train"]), split(split_frames["val"]), "cpu", Path(work),
            {}, lambda *_: None,
        )  # fmt: skip
        trainer.run()
    return round(time.monotonic() - started, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, default=PACK)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument(
        "--max-train-images", type=int, default=None, help="train on a seeded subset (a shorter, partial measurement)"
    )
    args = p.parse_args(argv)

    import pandas as pd
    from dermaops.embedded_s3 import EmbeddedS3
    from dermaops.store import ArtifactStore

    train_flags = [
        "--arch", args.arch, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
        "--finetune-epochs", str(args.finetune_epochs), "--finetune-depth", "2", "--batch-size",
        str(args.batch_size), "--lr", "3e-3", "--finetune-lr", "3e-4", "--weight-decay", "5e-4",
        "--label-smoothing", "0.1", "--class-weight-power", "0.5", "--patience", "0",
        "--num-threads", str(args.num_threads),
    ]  # fmt: skip
    if args.max_train_images:
        train_flags += ["--max-train-images", str(args.max_train_images)]
    with tempfile.TemporaryDirectory(prefix="dermaops-walltime-") as tmp, EmbeddedS3() as server:
        os.environ.update(server.env)
        bucket = f"walltime-{uuid.uuid4().hex[:8]}"
        store = ArtifactStore()
        store.ensure_bucket(bucket)
        root = f"s3://{bucket}"

        def env(name: str) -> dict:
            return {**os.environ, **server.env, "DERMAOPS_SCRATCH_DIR": f"{tmp}/{name}"}

        ingest, _ = stage(env("ingest"), "ingest", "--source", str(args.pack), "--datasets", f"{root}/datasets/ham")
        split_uri = f"{root}/runs/walltime/split"
        stage(env("split"), "split", "--dataset", ingest["dataset_uri"], "--out", split_uri)
        out = f"{root}/runs/walltime/models/cnn"
        cold, cold_s = stage(env("cold"), "train", "--split", split_uri, "--out", out, *train_flags)
        warm, warm_s = stage(env("warm"), "train", "--split", split_uri, "--out", out, *train_flags, "--force")
        frames = {
            name: pd.read_csv(io.BytesIO(store.get_bytes(f"{split_uri}/{name}.csv"))) for name in ("train", "val")
        }
    if args.max_train_images and len(frames["train"]) > args.max_train_images:  # the stage's own subset
        frames["train"] = frames["train"].sample(n=args.max_train_images, random_state=42).sort_index()
    no_cache_s = no_cache_training(args.pack, frames, args)
    print(
        json.dumps(
            {
                "benchmark": "train_walltime",
                "config": {k: v for k, v in vars(args).items() if k != "pack"},
                "n_train": cold["n_train"],
                "n_val": cold["n_val"],
                "cache_cold_stage_seconds": cold_s,
                "cache_warm_stage_seconds": warm_s,
                "no_cache_training_seconds": no_cache_s,
                "speedup_warm_vs_no_cache": round(no_cache_s / warm_s, 2),
                "images_per_s_warm": warm["images_per_s"],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
