"""The recipe ablation over several seeds at once: every variant x seed is one
`benchmarks/recipe_ablation.py` process (the train stage's own Trainer on the real 200 px pack, lesion-grouped
split), --jobs of them side by side. On a GPU one such run leaves the card mostly idle, so a whole ablation
table with three seeds per lever fits in minutes.

Prints one JSON object: per variant the mean and standard deviation over the seeds of the validation macro F1
under the fitted decision rule (the selection criterion: what `train --calibrate` maximises), of the plain
validation macro F1, and, for reporting only, of the test figures; with several seeds, the seed ensemble (mean
softmax of the seeds' models, decision rule refitted on validation); the variant chosen on validation; the runs'
own JSON files are in --out.

    python benchmarks/recipe_sweep.py --recipe full-gpu --device cuda --jobs 8     # the GPU levers, 3 seeds
    python benchmarks/recipe_sweep.py --variant base --variant sqrt:sampling_power=0.5,class_weight_power=0 --seeds 42
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Issue 18's levers, one change each from the recipe the sweep starts from (--recipe): the geometry and size
# the budget allows, the architecture, the augmentation policy, class sampling. GPU_LEVERS for full-gpu (its
# geometry at the sizes a GPU affords), CPU_LEVERS for quick-cpu (what fits its minutes).
GPU_LEVERS = (
    "base",
    "aspect_160:image_size=160",
    "squash_160:geometry=squash,image_size=160",
    "crop_160:geometry=crop,image_size=160",
    "aspect_128:image_size=128",
    "no_policy:auto_augment=none",
    "resnet34:arch=resnet34",
    "sqrt_sampling:sampling_power=0.5,class_weight_power=0",
)
CPU_LEVERS = (
    "base",
    "aspect:geometry=aspect,image_size=64",
    "crop:geometry=crop",
    "trivial:auto_augment=trivial",
    "sqrt_sampling:sampling_power=0.5,class_weight_power=0",
)
LEVERS = {"full-gpu": GPU_LEVERS, "quick-cpu": CPU_LEVERS}


def variant_arg(text: str) -> tuple[str, list[str]]:
    """NAME or NAME:FIELD=VALUE,FIELD=VALUE -> (name, [FIELD=VALUE, ...]); recipe=NAME starts that variant
    from another RECIPES entry."""
    name, _, sets = text.partition(":")
    pairs = [item for item in sets.split(",") if item]
    if not name or any("=" not in item for item in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME[:FIELD=VALUE,...], got {text!r}")
    return name, pairs


def mean_std(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "std": round(std, 4), "n": len(values)}


def summarise(runs: list[dict]) -> dict:
    """Mean/std over one variant's seeds. `adjusted` is the checkpoint scored as the quick recipe's evaluate
    scores it (decision rule fitted on validation, no TTA)."""
    pick = {
        "val_macro_f1": lambda r: r["cnn_pt"]["adjusted"]["val"]["macro_f1"],
        "val_macro_f1_plain": lambda r: r["cnn_pt"]["plain"]["val"]["macro_f1"],
        "val_balanced_accuracy": lambda r: r["cnn_pt"]["adjusted"]["val"]["balanced_accuracy"],
        "test_macro_f1": lambda r: r["cnn_pt"]["adjusted"]["test"]["macro_f1"],
        "test_balanced_accuracy": lambda r: r["cnn_pt"]["adjusted"]["test"]["balanced_accuracy"],
        "test_accuracy": lambda r: r["cnn_pt"]["adjusted"]["test"]["accuracy"],
        "test_df_recall": lambda r: r["cnn_pt"]["adjusted"]["test"]["recall"]["df"],
        "test_mel_recall": lambda r: r["cnn_pt"]["adjusted"]["test"]["recall"]["mel"],
        "train_seconds": lambda r: r["train_seconds"],
    }
    return {key: mean_std([get(r) for r in runs]) for key, get in pick.items()}


def ensemble(out: Path, runs: list[str]) -> dict:
    """The seeds' models as one: the mean of their plain softmax, then the decision rule fitted on validation
    to that mean, as `train --calibrate` fits it to one model (a seed ensemble costs one training per seed)."""
    import numpy as np
    from dermaops.calibration import fit_logit_adjustment
    from dermaops.dataset import CLASSES
    from dermaops.metrics import classification_metrics
    from dermaops.predictor import adjust_proba

    kept = [np.load(out / f"{run}.npz") for run in runs]
    proba = {part: np.mean([k[part] for k in kept], axis=0) for part in ("val", "test")}
    first = kept[0]
    fit = fit_logit_adjustment(proba["val"], first["y_val"], first["y_train"], list(CLASSES))
    result = {"members": len(runs), "tau": fit["logit_adjustment"]["tau"]}
    for part in ("val", "test"):
        pr = adjust_proba(proba[part], fit["logit_bias"])
        m = classification_metrics(first[f"y_{part}"], pr.argmax(1), pr, list(CLASSES))
        result[part] = {k: round(m[k], 4) for k in ("macro_f1", "balanced_accuracy", "accuracy", "macro_auc")}
        result[part]["df_recall"] = round(m["per_class"]["df"]["recall"], 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variant", type=variant_arg, action="append", help="NAME[:FIELD=VALUE,...] (default: the recipe's LEVERS)"
    )
    p.add_argument("--recipe", default="quick-cpu", help="the RECIPES entry every variant starts from")
    p.add_argument("--seeds", default="42,43,44", help="training seeds, comma-separated")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (default: cores / jobs)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is killed")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dermaops-sweep")
    p.add_argument("--pack", type=Path, default=None, help="the pack (default: recipe_ablation.py's, 200 px)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    variants = args.variant or [variant_arg(v) for v in LEVERS.get(args.recipe, ("base",))]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        p.error(f"variant names repeat: {names}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    args.out.mkdir(parents=True, exist_ok=True)

    def one(name: str, sets: list[str], seed: int) -> tuple[str, int, dict | str]:
        run = f"{name}-s{seed}"
        recipe = next((item.split("=", 1)[1] for item in sets if item.startswith("recipe=")), args.recipe)
        sets = [item for item in sets if not item.startswith("recipe=")]
        cmd = [sys.executable, str(HERE / "recipe_ablation.py"), "--name", run, "--recipe", recipe,
               "--device", args.device, "--threads", str(threads), "--out", str(args.out),
               "--set", f"seed={seed}"]  # fmt: skip
        for item in sets:
            cmd += ["--set", item]
        if args.pack:
            cmd += ["--pack", str(args.pack)]
        with open(args.out / f"{run}.log", "w") as log:
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                return name, seed, f"killed after {args.timeout:g} s (log: {args.out / f'{run}.log'})"
        if proc.returncode != 0:
            return name, seed, f"exit code {proc.returncode} (log: {args.out / f'{run}.log'})"
        return name, seed, json.loads(proc.stdout.strip().splitlines()[-1])

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda job: one(*job), [(n, s, seed) for seed in seeds for n, s in variants]))
    by_variant: dict[str, list[dict]] = {}
    failures = {}
    for name, seed, result in results:
        if isinstance(result, dict):
            by_variant.setdefault(name, []).append(result)
        else:
            failures[f"{name}-s{seed}"] = result
    table = {name: {"set": dict(item.split("=", 1) for item in sets), **summarise(by_variant[name])}
             for name, sets in variants if name in by_variant}  # fmt: skip
    complete = {name: row for name, row in table.items() if row["val_macro_f1"]["n"] == len(seeds)}
    if len(seeds) > 1:
        for name in complete:
            complete[name]["seed_ensemble"] = ensemble(args.out, [f"{name}-s{seed}" for seed in seeds])
    chosen = max(complete, key=lambda n: complete[n]["val_macro_f1"]["mean"]) if complete else None
    print(json.dumps({
        "benchmark": "recipe_sweep", "recipe": args.recipe, "device": args.device, "seeds": seeds,
        "jobs": args.jobs, "threads_per_run": threads, "chosen_on_validation": chosen, "variants": table,
        "failures": failures, "total_seconds": round(time.monotonic() - started, 1),
    }), flush=True)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
