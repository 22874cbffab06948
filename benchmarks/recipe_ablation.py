"""One recipe on the real 200 px pack (or any pack), trained in-process with the train stage's own Trainer:
the driver of the recipe ablation (issues 10 and 18). No S3, no subprocesses: the lesion-grouped split of
the split stage's defaults (fractions 0.8/0.1/0.1, seed 42), images decoded as the image cache decodes them, the same
Trainer, then the best checkpoint (cnn.pt) scored on validation and test:

  plain        argmax of the softmax;
  adjusted     + the logit adjustment fitted on VALIDATION (what `train --calibrate` stores), fitted and
               applied without test-time augmentation (as the quick recipe's evaluate scores);
  adjusted_tta the same with 8-view TTA on both sides (as the stage fits it and a TTA evaluate scores);
  last_raw     (runs with --ema-decay) the un-averaged weights after the last epoch, plain and adjusted.

The plain (no TTA) validation and test probabilities of cnn.pt are kept beside the JSON (<name>.npz).

Choose on the `val` figures only; the `test` figures are for reporting.

    python benchmarks/recipe_ablation.py --name quick-cpu                       # the quick-cpu recipe
    python benchmarks/recipe_ablation.py --name la --set loss_tau=1 --set class_weight_power=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT.parent / "shared" / "data" / "ham10000-200px"
# The train flags a quick-cpu run of the DAG passes (evaluate's tta and the baseline's trees are not train's).
TRAIN_ONLY = {"baseline_trees", "tta"}
HISTORY_KEYS = ("epoch", "phase", "val_macro_f1", "val_acc", "images_per_s")


def load_pack(pack: Path, frame, cache_dir: Path):
    """(metadata with split and label, images uint8 (N, height, width, 3) of the frame in metadata order)."""
    import pandas as pd
    from dermaops.dataset import CLASSES, image_id_of
    from dermaops.imagecache import decode_image
    from dermaops.splitting import lesion_split

    meta = pd.read_csv(pack / "HAM10000_metadata.csv")
    meta["split"] = lesion_split(meta, (0.8, 0.1, 0.1), 42)
    meta["label"] = meta["dx"].map(CLASSES.index)
    cached = cache_dir / f"{pack.name}-{frame.name}.npy"
    if cached.exists():
        return meta, np.load(cached)
    position = {image_id: i for i, image_id in enumerate(meta["image_id"])}
    images = np.zeros((len(meta), *frame.shape, 3), dtype=np.uint8)
    for archive in sorted(pack.glob("HAM10000_images_part_*.zip")):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                image_id = image_id_of(member)
                if image_id in position:
                    images[position[image_id]] = decode_image(zf.read(member), frame)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Runs started side by side (benchmarks/recipe_sweep.py) may decode at once: each writes its own file.
    tmp = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(tmp, images)
    tmp.replace(cached)
    return meta, images


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the run's name (the output file's stem)")
    p.add_argument("--recipe", default="quick-cpu", help="the RECIPES entry the run starts from")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a TrainConfig field over it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train and score")
    p.add_argument("--pack", type=Path, default=PACK)
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score with test-time augmentation (the frame's symmetry views; costs a forward each)",
    )
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dermaops-recipe")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the Trainer's epoch lines

    import torch
    from dermaops.calibration import fit_logit_adjustment
    from dermaops.checkpoint import load_checkpoint, save_checkpoint
    from dermaops.config import RECIPES, TrainConfig
    from dermaops.dataset import CLASSES
    from dermaops.frame import Frame
    from dermaops.metrics import classification_metrics
    from dermaops.models import predict_proba, symmetry_views
    from dermaops.predictor import adjust_proba
    from dermaops.training import Split, Trainer

    values = {k: v for k, v in RECIPES[args.recipe].items() if k not in TRAIN_ONLY}
    for item in args.set:
        key, _, value = item.partition("=")
        values[key] = parse_value(value)
    cfg = TrainConfig(**values, device=args.device, num_threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    frame = Frame(cfg.geometry, cfg.image_size)
    meta, images = load_pack(args.pack, frame, args.out / "cache")
    classes = list(CLASSES)
    parts = {}
    for name in ("train", "val", "test"):
        rows = meta.index[meta["split"] == name].to_numpy()
        rows = rows[np.argsort(meta.loc[rows, "image_id"].to_numpy())]  # the split stage's order
        parts[name] = (images[rows], meta.loc[rows, "label"].to_numpy())

    def split(name):
        x, y = parts[name]
        return Split.in_memory(torch.from_numpy(x), torch.from_numpy(y).long())

    work = Path(tempfile.mkdtemp(prefix=f"recipe-{args.name}-", dir=args.out))
    trainer = Trainer(cfg, classes, split("train"), split("val"), args.device, work, {}, lambda *_: None)
    started = time.monotonic()
    state = trainer.run()
    train_s = time.monotonic() - started
    save_checkpoint(work / "last_raw.pt", trainer.model, trainer.meta)  # to re-score without retraining

    def score(model, model_meta, keep: Path | None = None) -> dict:
        out = {}
        proba = {
            (name, tta): predict_proba(model, parts[name][0], model_meta, tta=tta)
            for name in ("val", "test")
            for tta in ttas
        }
        if keep is not None:  # the plain probabilities, for seed ensembles (benchmarks/recipe_sweep.py)
            np.savez_compressed(keep, val=proba["val", False], test=proba["test", False], y_val=parts["val"][1],
                                y_test=parts["test"][1], y_train=parts["train"][1])  # fmt: skip
        for tta in ttas:
            fit = fit_logit_adjustment(proba["val", tta], parts["val"][1], parts["train"][1], classes)
            for name in ("val", "test"):
                y = parts[name][1]
                variants = {"adjusted": adjust_proba(proba[name, tta], fit["logit_bias"])}
                if not tta:
                    variants["plain"] = proba[name, tta]
                for label, pr in variants.items():
                    m = classification_metrics(y, pr.argmax(1), pr, classes)
                    key = f"{label}{'_tta' if tta else ''}"
                    out.setdefault(key, {})[name] = {
                        "macro_f1": round(m["macro_f1"], 4),
                        "balanced_accuracy": round(m["balanced_accuracy"], 4),
                        "accuracy": round(m["accuracy"], 4),
                        "macro_auc": round(m["macro_auc"], 4),
                        "recall": {c: round(v["recall"], 3) for c, v in m["per_class"].items()},
                    }
            out[f"adjusted{'_tta' if tta else ''}"]["tau"] = fit["logit_adjustment"]["tau"]
        return out

    ttas = (False, True) if args.tta else (False,)
    best_model, best_meta = load_checkpoint(work / "cnn.pt")
    best_model = best_model.to(args.device)
    result = {
        "name": args.name,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "num_threads")},
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "tta_views": len(symmetry_views(frame.shape)) if args.tta else 0,
        "pack": args.pack.name,
        "best": {"epoch": state.best.epoch, "phase": state.best.phase, "val_macro_f1": state.best.val_macro_f1},
        "history": [{k: r.to_dict()[k] for k in HISTORY_KEYS} for r in state.history],
        "cnn_pt": score(best_model, best_meta, keep=args.out / f"{args.name}.npz"),
    }
    if trainer.ema is not None:
        result["last_raw"] = score(trainer.model.eval(), trainer.meta)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
