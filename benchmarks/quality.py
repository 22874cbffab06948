"""Real-data quality benchmark: the real stages (ingest -> split -> train -> evaluate) on the 200 px pack.

For each DAG recipe of --recipes (dermaops.config.RECIPES: the flags a DAG run with that recipe passes) and
each training seed of --seeds, two runs of split -> train -> evaluate, every stage a `python -m dermaops`
subprocess against an S3 endpoint (the embedded loopback server unless DERMAOPS_S3_ENDPOINT_URL is set):
  lesion      lesion-grouped stratified split (no lesion in two splits): the honest figure;
  dermamnist  the official DermaMNIST image-level split (leaks lesions), to compare with published
              DermaMNIST / MedMNIST+ figures (ResNet-18 with ImageNet weights at 128 px: accuracy 0.792).
The split stays the split stage's default (seed 42), so the spread is the training's. Prints one JSON object:
per recipe, split and seed the test metrics of `evaluate` (as evaluate scores by default: the recipe's TTA
setting, the validation-fitted logit adjustment and temperature), per-class recall, test ECE after temperature
scaling, the Grad-CAM pointing-game hit rate on melanomas against the lesion masks, the train stage's time;
per recipe and split the mean and standard deviation over the seeds; and which of issue 18's goals the means
meet (GOALS). Everything is chosen on validation elsewhere (benchmarks/recipe_ablation.py); this reports test.

    python benchmarks/quality.py                                        # both recipes, 3 seeds, both splits
    python benchmarks/quality.py --recipes quick-cpu --only lesion      # the main command's model
    python benchmarks/quality.py --jobs 6                               # on a GPU: runs side by side
    python benchmarks/quality.py --seeds 42 --train-args "--epochs 2"   # override train flags (they win)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dermaops.config import RECIPES, TrainConfig, argv_item, flag

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT.parent / "shared" / "data" / "ham10000-200px"
# The train flags of a DAG run with that recipe (dermaops.config.RECIPES, the trigger form's table).
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def recipe_flags(recipe: str) -> list[str]:
    # A blank value ("") keeps the stage's default, as the DAG's argv drops it.
    return [item for k, v in RECIPES[recipe].items() if k in TRAIN_FIELDS and (item := argv_item(flag(k), v))]


KEYS = (
    "accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "macro_auc", "mel_recall", "min_class_recall",
    "ece_calibrated", "gradcam_pointing_mel", "gradcam_energy_mel", "train_seconds", "best_val_macro_f1",
)  # fmt: skip
TRAIN_KEYS = ("best_val_macro_f1", "best_epoch", "epochs_run", "images_per_s", "logit_adjustment", "train_seconds")
# Issue 18's goals, judged on the mean over the seeds: (recipe, split, metric) -> (minimum or maximum, bound).
GOALS = {
    ("full-gpu", "lesion", "macro_f1"): (">=", 0.65),
    ("full-gpu", "lesion", "balanced_accuracy"): (">=", 0.65),
    ("full-gpu", "lesion", "macro_auc"): (">=", 0.95),
    ("full-gpu", "dermamnist", "accuracy"): (">=", 0.82),
    ("full-gpu", "lesion", "ece_calibrated"): ("<=", 0.05),
    ("full-gpu", "lesion", "gradcam_pointing_mel"): (">=", 0.80),
    ("quick-cpu", "lesion", "macro_f1"): (">=", 0.55),
    ("quick-cpu", "lesion", "min_class_recall"): (">", 0.0),
    ("quick-cpu", "lesion", "mel_recall"): (">=", 0.60),
    ("quick-cpu", "lesion", "train_seconds"): ("<=", 360.0),  # on the 2-core CPU machine it is meant for
    ("quick-cpu", "lesion", "ece_calibrated"): ("<=", 0.05),
    ("quick-cpu", "lesion", "gradcam_pointing_mel"): (">=", 0.70),
}


def stage(env: dict, *argv: str) -> tuple[dict, float]:
    """Run one stage; its stderr streams through (progress lines); returns (summary, seconds)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dermaops", *argv], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"quality benchmark: stage {argv[0]} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), round(time.monotonic() - started, 1)


def run_one(env, root: str, dataset_uri: str, name: str, split_flags: list[str], train_args, eval_args) -> dict:
    from dermaops.store import ArtifactStore, S3Uri

    prefix = f"{root}/runs/quality-{name}"
    split, split_s = stage(env, "split", "--dataset", dataset_uri, "--out", f"{prefix}/split", *split_flags)
    train, train_s = stage(env, "train", "--split", f"{prefix}/split", "--out", f"{prefix}/models/cnn", *train_args)
    evaluation, eval_s = stage(
        env,
        "evaluate",
        "--split", f"{prefix}/split",
        "--model", f"{prefix}/models/cnn",
        "--out", f"{prefix}/evaluation",
        "--registry", f"{root}/registry/quality-{name}",
        *eval_args,
    )  # fmt: skip
    metrics = ArtifactStore().get_json(S3Uri.parse(evaluation["metrics_uri"]))
    recall = {cls: m["recall"] for cls, m in metrics["test"]["per_class"].items()}
    mel_cam = ((metrics.get("gradcam") or {}).get("per_class") or {}).get("mel") or {}
    test = {
        **evaluation,
        "recall": recall,
        "min_class_recall": min(recall.values()),
        "gradcam_pointing_mel": mel_cam.get("pointing_hit_rate"),
        "gradcam_energy_mel": mel_cam.get("energy_ratio"),
        "gradcam_mask_source": (metrics.get("gradcam") or {}).get("mask_source"),
        "train_seconds": train.get("train_seconds"),
        "best_val_macro_f1": train.get("best_val_macro_f1"),
    }
    return {
        "split_counts": split.get("counts"),
        "train": {k: train.get(k) for k in TRAIN_KEYS},
        "test": test,
        "seconds": {"split": split_s, "train": train_s, "evaluate": eval_s},
    }


def seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "std": round(std, 4)}


def recipes_arg(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    unknown = [name for name in names if name not in RECIPES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected recipes among {', '.join(RECIPES)}, got {text!r}")
    return names


def _meets(value, op: str, bound: float) -> bool:
    if value is None:
        return False
    return {">=": value >= bound, "<=": value <= bound, ">": value > bound}[op]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, default=PACK, help="the real HAM10000 pack (default: 200 px, with masks)")
    p.add_argument("--recipes", type=recipes_arg, default=list(RECIPES), help="DAG recipes, comma-separated")
    p.add_argument("--train-args", default="", help="extra train flags, appended to each recipe's (they win)")
    p.add_argument("--only", choices=("lesion", "dermamnist"), default=None, help="run one of the two splits")
    p.add_argument("--seeds", type=seeds_arg, default=[42, 43, 44], help="training seeds, comma-separated")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (a GPU fits several)")
    args = p.parse_args(argv)
    extra = shlex.split(args.train_args)

    from dermaops.embedded_s3 import EmbeddedS3
    from dermaops.store import ArtifactStore

    splits = {
        "lesion": ["--strategy", "lesion"],
        "dermamnist": ["--strategy", "dermamnist", "--official-splits", str(args.pack / "dermamnist_splits.csv")],
    }
    started = time.monotonic()
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="dermaops-quality-") as scratch, EmbeddedS3() as server:
        env = {**os.environ, **server.env, "DERMAOPS_SCRATCH_DIR": scratch}
        if args.jobs > 1:  # the runs share the cores: torch would start one thread per core in each of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
        os.environ.update(server.env)
        bucket = f"quality-{uuid.uuid4().hex[:8]}"
        ArtifactStore().ensure_bucket(bucket)
        root = f"s3://{bucket}"
        ingest, _ = stage(env, "ingest", "--source", str(args.pack), "--datasets", f"{root}/datasets/ham10000")
        jobs = [
            (recipe, split, seed)
            for recipe in args.recipes
            for split in ((args.only,) if args.only else splits)
            for seed in args.seeds
        ]

        def one(job):
            recipe, split, seed = job
            train_args = [*recipe_flags(recipe), "--seed", str(seed), *extra]
            eval_args = [argv_item("--tta", RECIPES[recipe]["tta"])] if "tta" in RECIPES[recipe] else []
            name = f"{recipe}-{split}-{seed}"
            return run_one(env, root, ingest["dataset_uri"], name, splits[split], train_args, eval_args)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for (recipe, split, seed), run in zip(jobs, pool.map(one, jobs), strict=True):
                runs.setdefault(recipe, {}).setdefault(split, {})[seed] = run

    result: dict = {"benchmark": "quality", "pack": args.pack.name, "seeds": args.seeds, "cpu_threads": os.cpu_count()}
    for recipe, by_split in runs.items():
        result[recipe] = {"train_flags": [*recipe_flags(recipe), *extra]}
        for split, by_seed in by_split.items():
            tests = {seed: run["test"] for seed, run in by_seed.items()}
            result[recipe][split] = {
                "per_seed": {seed: {k: test.get(k) for k in (*KEYS, "recall")} for seed, test in tests.items()},
                "mean_std": {k: mean_std([test.get(k) for test in tests.values()]) for k in KEYS},
                "ablation": {seed: test.get("ablation") for seed, test in tests.items()},
            }
    result["goals"] = {
        f"{recipe} {split} {metric} {op} {bound}": _meets(result[recipe][split]["mean_std"][metric]["mean"], op, bound)
        for (recipe, split, metric), (op, bound) in GOALS.items()
        if recipe in runs and split in runs[recipe]
    }
    result["details"] = {
        recipe: {
            split: {seed: {k: v for k, v in run.items() if k != "test"} for seed, run in by_seed.items()}
            for split, by_seed in by_split.items()
        }
        for recipe, by_split in runs.items()
    }
    result["total_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
