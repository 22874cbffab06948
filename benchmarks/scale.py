"""Does the image cache scale? Cache build images/s, training images/s and peak RSS at N = 10k, 50k, 200k;
prints one JSON object.

Data: synthetic datasets made from the real 28 px pack (../shared/data/ham10000-28px). Image i is a copy
of pack image i mod 10,015: copy 0 keeps the original JPEG bytes, later copies are a dihedral transform
(flip / 90-degree rotation) and a brightness shift of it, re-encoded as JPEG; each gets a new image_id
(SYN_0000000...) and a copy of its metadata row with that id and a new lesion_id. They are written in the
official layout (HAM10000_metadata.csv + two image zips), as ingest stores a dataset.

Per N, each measured in its own subprocess so that ru_maxrss belongs to that step alone:
  build: dermaops.imagecache.build_shards reading the zips, decoding at --image-size in the process pool,
         writing the 64 MiB shards (sha256 included) to local disk: images/s and the builder's peak RSS.
         (The S3 upload of a real stage is not included.)
  train: a DataLoader with --workers worker processes over a ShardDataset of ALL N images (labels from the
         metadata), sampling --batches random batches of --batch-size drawn across the whole dataset;
         each batch goes through the training recipe's data path (to_float, augment_batch, normalize) and
         a forward + backward + AdamW step of a small CNN (so the data path, not the model, dominates and
         any slow-down with N shows). images/s over the batches after --warmup; peak RSS of the training
         process and, separately, of its largest DataLoader worker. The shards are verified (sha256) once
         in the parent before the loader starts, as in a stage, and are in the page cache (just written).
The train step is run --rounds times per N, interleaved across N (a neighbour's load hits all alike), and
the median images/s is reported. Goals: rss(200k) <= 1.3 x rss(10k); images/s(200k) >= 0.9 x images/s(10k).

    python benchmarks/scale.py                                  # 10k, 50k, 200k at 64 px
    python benchmarks/scale.py --sizes 10000 20000 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT.parent / "shared" / "data" / "ham10000-28px"
ARCHIVES = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
INDEX = "index.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed training batches per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (worker start, first faults)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pack", type=Path, default=PACK)
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    # Internal: the subprocess steps.
    p.add_argument("--step", choices=("build", "train"), help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: KiB


# -- synthetic datasets ------------------------------------------------------------------------


def _variant(data: bytes, k: int) -> bytes:
    from PIL import Image, ImageEnhance

    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    ops = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
           Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
           Image.Transpose.TRANSVERSE)  # fmt: skip
    op = ops[k % 8]
    if op is not None:
        rgb = rgb.transpose(op)
    rgb = ImageEnhance.Brightness(rgb).enhance(1.0 + 0.04 * ((k // 8) % 5 - 2 + (k // 8 == 0)))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=90)
    return out.getvalue()


def synthesize(pack: Path, n: int, directory: Path) -> float:
    """The N-image synthetic dataset in the official layout; returns seconds taken."""
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    with open(pack / "HAM10000_metadata.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        rows = {row["image_id"]: row for row in reader}
    sources = []
    for archive in ARCHIVES:
        with zipfile.ZipFile(pack / archive) as zf:
            sources += [(Path(i.filename).stem, zf.read(i)) for i in zf.infolist() if i.filename.endswith(".jpg")]
    half = n // 2
    with open(directory / "HAM10000_metadata.csv", "w", newline="") as meta:
        writer = csv.DictWriter(meta, fieldnames=fields)
        writer.writeheader()
        zips = [zipfile.ZipFile(directory / a, "w", zipfile.ZIP_STORED) for a in ARCHIVES]
        try:
            for i in range(n):
                source_id, data = sources[i % len(sources)]
                k = i // len(sources)
                image_id = f"SYN_{i:07d}"
                zips[i >= half].writestr(f"{image_id}.jpg", data if k == 0 else _variant(data, k))
                row = dict(rows[source_id], image_id=image_id, lesion_id=f"{rows[source_id]['lesion_id']}_c{k}")
                writer.writerow(row)
        finally:
            for zf in zips:
                zf.close()
    return time.monotonic() - started


# -- subprocess steps --------------------------------------------------------------------------


def step_build(args) -> dict:
    from dermaops.imagecache import build_shards

    def items():
        for archive in ARCHIVES:
            with zipfile.ZipFile(args.dir / archive) as zf:
                for info in zf.infolist():
                    yield Path(info.filename).stem, zf.read(info)

    started = time.monotonic()
    ids, shards = build_shards(items(), args.image_size, args.dir / "cache")
    seconds = time.monotonic() - started
    index = {
        "size": args.image_size,
        "ids": ids,
        "shards": [{"path": str(s.path), "rows": s.rows, "sha256": s.sha256, "nbytes": s.nbytes} for s in shards],
    }
    (args.dir / INDEX).write_text(json.dumps(index))
    return {
        "images": len(ids),
        "shards": len(shards),
        "cache_bytes": sum(s.nbytes for s in shards),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(ids) / seconds, 1),
        "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
    }


def _small_cnn(num_classes: int):
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))  # fmt: skip


def step_train(args) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    from dermaops.augment import augment_batch
    from dermaops.dataset import CLASSES
    from dermaops.imagecache import CachedImages, ShardFile, collate_batch
    from dermaops.models import normalize, to_float
    from torch.utils.data import DataLoader, RandomSampler

    torch.set_num_threads(1)  # the loader's workers take the other core(s)
    torch.manual_seed(0)
    index = json.loads((args.dir / INDEX).read_text())
    files = [ShardFile(Path(s["path"]), s["rows"], s["sha256"], s["nbytes"]) for s in index["shards"]]
    cache = CachedImages(index["ids"], files, index["size"])
    meta = pd.read_csv(args.dir / "HAM10000_metadata.csv", usecols=["image_id", "dx"])
    labels = meta["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    opened = time.monotonic()
    dataset = cache.dataset(meta["image_id"].tolist(), labels)  # verifies every shard once, here
    open_seconds = time.monotonic() - opened
    total = args.warmup + args.batches
    sampler = RandomSampler(dataset, replacement=True, num_samples=total * args.batch_size)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=collate_batch,
        prefetch_factor=4,
    )  # fmt: skip
    model = _small_cnn(len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    mean, std = [0.76, 0.55, 0.57], [0.14, 0.15, 0.17]
    started = None
    losses = []
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:
            started = time.monotonic()
        x = normalize(augment_batch(to_float(x), gen), mean, std)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.monotonic() - started
    del loader  # joins the workers, so their peak RSS is in RUSAGE_CHILDREN
    return {
        "images": len(dataset),
        "timed_images": args.batches * args.batch_size,
        "images_per_s": round(args.batches * args.batch_size / seconds, 1),
        "verify_seconds": round(open_seconds, 2),
        "loss_finite": bool(np.isfinite(losses).all()),
        "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
        "worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
    }


def run_step(step: str, directory: Path, args) -> dict:
    argv = [sys.executable, __file__, "--step", step, "--dir", str(directory), "--image-size", str(args.image_size),
            "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--warmup", str(args.warmup),
            "--workers", str(args.workers)]  # fmt: skip
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scale: the {step} step for {directory.name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.step:
        out = step_build(args) if args.step == "build" else step_train(args)
        print(json.dumps(out))
        return out
    work = args.work or Path(tempfile.mkdtemp(prefix="dermaops-scale-"))
    result = {"image_size": args.image_size, "batch_size": args.batch_size, "timed_batches": args.batches,
              "workers": args.workers, "rounds": args.rounds, "n": {}}  # fmt: skip
    try:
        dirs = {}
        for n in args.sizes:
            dirs[n] = work / f"n{n}"
            synth = synthesize(args.pack, n, dirs[n])
            build = run_step("build", dirs[n], args)
            result["n"][str(n)] = {"synthesize_seconds": round(synth, 1), "build": build, "train_runs": []}
        for _ in range(args.rounds):
            for n in args.sizes:
                result["n"][str(n)]["train_runs"].append(run_step("train", dirs[n], args))
        for entry in result["n"].values():
            runs = entry["train_runs"]
            entry["train"] = {
                "images_per_s": statistics.median(r["images_per_s"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in runs),
            }
        lo, hi = result["n"][str(min(args.sizes))]["train"], result["n"][str(max(args.sizes))]["train"]
        result["ratios"] = {
            "sizes": [min(args.sizes), max(args.sizes)],
            "rss": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3),
            "worker_rss": round(hi["worker_peak_rss_mb"] / lo["worker_peak_rss_mb"], 3),
            "images_per_s": round(hi["images_per_s"] / lo["images_per_s"], 3),
        }
        result["goals_met"] = {
            "rss_flat": result["ratios"]["rss"] <= 1.3 and result["ratios"]["worker_rss"] <= 1.3,
            "throughput_holds": result["ratios"]["images_per_s"] >= 0.9,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
