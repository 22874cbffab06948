"""Real-data quality benchmark: the real stages (ingest -> split -> train -> evaluate) on the 28 px pack.

Two runs, each split -> train -> evaluate, every stage a `python -m dermaops` subprocess against an
S3 endpoint (the embedded loopback server unless DERMAOPS_S3_ENDPOINT_URL is set):
  lesion      lesion-grouped stratified split (no lesion in two splits): the honest figure;
  dermamnist  the official DermaMNIST image-level split (leaks lesions), to compare with
              published DermaMNIST results at 28 px (ResNet-18: acc 0.735 / AUC 0.917; AutoML 0.768).
Each run is repeated for every training seed of --seeds (the split stays the split stage's default, seed
42, so the spread is the training's). Prints one JSON object: per split and seed the test metrics of
`evaluate` (scored as evaluate does by default: with test-time augmentation, and the logit adjustment that
`train --calibrate` fitted on the validation split), the same metrics with each of those switched off
(`*_ablation`), the training summary and wall times; per split the mean and standard deviation over the
seeds; and whether the issue's goals are met by the means (official acc >= 0.78 and AUC >= 0.93; lesion
macro F1 >= 0.60 and balanced accuracy >= 0.65).

    python benchmarks/quality.py                                       # the DAG's full-gpu recipe, 3 seeds
    python benchmarks/quality.py --jobs 6                              # on a GPU: all six runs at once
    python benchmarks/quality.py --seeds 42 --train-args "--epochs 2 --finetune-epochs 1"   # override flags
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
PACK = ROOT.parent / "shared" / "data" / "ham10000-28px"
# The train flags of a DAG run with that recipe (dermaops.config.RECIPES, the trigger form's table).
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def recipe_flags(recipe: str) -> list[str]:
    return [argv_item(flag(k), v) for k, v in RECIPES[recipe].items() if k in TRAIN_FIELDS]


LESION_KEYS = ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1", "macro_auc", "mel_recall", "ece_calibrated")
TRAIN_KEYS = ("best_val_macro_f1", "best_epoch", "epochs_run", "images_per_s", "logit_adjustment")
OFFICIAL_KEYS = ("accuracy", "macro_auc", "balanced_accuracy", "macro_f1", "ece_calibrated")
# The goals, judged on the mean over the seeds: (split, metric) -> minimum.
GOALS = {
    ("lesion", "macro_f1"): 0.60,
    ("lesion", "balanced_accuracy"): 0.65,
    ("dermamnist", "accuracy"): 0.78,
    ("dermamnist", "macro_auc"): 0.93,
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


def run_one(env: dict, root: str, dataset_uri: str, name: str, split_flags: list[str], train_args: list[str]):
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
    )  # fmt: skip
    return {
        "split_counts": split.get("counts"),
        "train": {k: train.get(k) for k in TRAIN_KEYS},
        "test": evaluation,
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, default=PACK, help="the real 28 px HAM10000 pack")
    p.add_argument("--recipe", choices=list(RECIPES), default="full-gpu", help="the DAG recipe to train")
    p.add_argument("--train-args", default="", help="extra train flags, appended to the recipe (they win)")
    p.add_argument("--only", choices=("lesion", "dermamnist"), default=None, help="run one of the two splits")
    p.add_argument("--seeds", type=seeds_arg, default=[42, 43, 44], help="training seeds, comma-separated")
    p.add_argument("--jobs", type=int, default=1, help="split x seed runs side by side (a GPU fits several)")
    args = p.parse_args(argv)
    extra = shlex.split(args.train_args)

    from dermaops.embedded_s3 import EmbeddedS3
    from dermaops.store import ArtifactStore

    splits = {
        "lesion": ["--strategy", "lesion"],
        "dermamnist": ["--strategy", "dermamnist", "--official-splits", str(args.pack / "dermamnist_splits.csv")],
    }
    keys = {"lesion": LESION_KEYS, "dermamnist": OFFICIAL_KEYS}
    started = time.monotonic()
    runs: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dermaops-quality-") as scratch, EmbeddedS3() as server:
        env = {**os.environ, **server.env, "DERMAOPS_SCRATCH_DIR": scratch}
        if args.jobs > 1:  # the runs share the cores: torch would start one thread per core in each of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
        os.environ.update(server.env)
        bucket = f"quality-{uuid.uuid4().hex[:8]}"
        ArtifactStore().ensure_bucket(bucket)
        root = f"s3://{bucket}"
        ingest, _ = stage(env, "ingest", "--source", str(args.pack), "--datasets", f"{root}/datasets/ham10000")
        flags = recipe_flags(args.recipe)
        jobs = [(split, seed) for split in ((args.only,) if args.only else splits) for seed in args.seeds]

        def one(job):
            split, seed = job
            train_args = [*flags, "--seed", str(seed), *extra]
            return run_one(env, root, ingest["dataset_uri"], f"{split}-{seed}", splits[split], train_args)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for (split, seed), run in zip(jobs, pool.map(one, jobs), strict=True):
                runs.setdefault(split, {})[seed] = run

    result: dict = {"benchmark": "quality", "recipe": args.recipe, "train_flags": [*flags, *extra], "seeds": args.seeds}
    result["cpu_threads"] = os.cpu_count()
    for split, by_seed in runs.items():
        tests = {seed: run["test"] for seed, run in by_seed.items()}
        result[split] = {
            "per_seed": {seed: {k: test.get(k) for k in keys[split]} for seed, test in tests.items()},
            "mean_std": {k: mean_std([test.get(k) for test in tests.values()]) for k in keys[split]},
            "ablation": {seed: test.get("ablation") for seed, test in tests.items()},
        }
    result["goals"] = {
        f"{split} {metric} >= {goal}": (result[split]["mean_std"][metric]["mean"] or 0) >= goal
        for (split, metric), goal in GOALS.items()
        if split in result
    }
    result["details"] = {
        split: {seed: {k: v for k, v in run.items() if k != "test"} for seed, run in by_seed.items()}
        for split, by_seed in runs.items()
    }
    result["total_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
