"""Multi-GPU scaling of DermaOps's real training loop on one host: images/s at world size 1 and N.

Each world size runs as ranks under torch.distributed's elastic launcher (`python -m torch.distributed.run
--standalone`, what `train --nproc-per-node` does), each rank running the real `Trainer.train_epoch` under
DistributedDataParallel (NCCL on GPUs, gloo on CPU) on synthetic uint8 images resident on its device, so
what is timed is the training step plus the gradient all-reduce, not the cache or the disk. The batch per
rank is fixed (weak scaling, as torchvision's reference scripts scale: --batch-size per GPU), so world
size N trains N times the images per step. Prints one JSON object:

    images_per_s_by_world_size  {1: ..., N: ...}: median over --rounds epochs, all ranks together
    scaling_efficiency          images/s(N) / (N x images/s(1)); 1.0 = perfectly linear

    python benchmarks/ddp_throughput.py --world-size 8                # a GPU host: 1 GPU against 8
    python benchmarks/ddp_throughput.py --device cpu --world-size 2 --image-size 32 --batch-size 8 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--world-size", type=int, default=None, help="the larger world size (default: every visible GPU)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128, help="images per rank and step")
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per world size")
    return p.parse_args(argv)


def rank_main(args) -> None:
    """One rank: time train_epoch under DDP; rank 0 prints the job's images/s."""
    import torch
    from dermaops import distributed
    from dermaops.dataset import CLASSES
    from dermaops.training import Split, TrainConfig, Trainer

    dist = distributed.from_env()
    device = distributed.device_for(dist, args.device)
    distributed.init(dist, device)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // dist.local_world_size))
    global_batch = args.batch_size * dist.world_size
    n = args.steps * global_batch
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
    train = Split.in_memory(images.to(device), labels.to(device))
    cfg = TrainConfig(
        arch=args.arch, image_size=args.image_size, pretrained="none", epochs=100, finetune_epochs=0,
        batch_size=global_batch, patience=0, seed=0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, list(CLASSES), train, train, device, Path(tmp), {}, lambda *_: None, dist)
        learn, optimizer, scheduler = trainer.configure(1)
        trainer._sync()
        rates = []
        for epoch in range(args.rounds + 1):  # epoch 0 warms up: allocator, kernels, NCCL communicators
            rate = trainer.train_epoch(1, epoch, learn, optimizer, scheduler)["images_per_s"]
            if epoch:
                rates.append(rate)
    if dist.primary:
        print(json.dumps({"world_size": dist.world_size, "images_per_s": statistics.median(rates)}), flush=True)
    distributed.shutdown(dist)


def run_world(args, argv: list[str], world: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    proc = subprocess.run(
        [*cmd, __file__, *argv], stdout=subprocess.PIPE, text=True, timeout=args.timeout, env={**os.environ}
    )
    if proc.returncode != 0:
        raise SystemExit(f"ddp_throughput: world size {world} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_s"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if "LOCAL_RANK" in os.environ:
        rank_main(args)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ddp_throughput: error: torch sees no CUDA device (use --device cpu)")
    nproc = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    started = time.monotonic()
    rates = {1: run_world(args, argv, 1)}
    if nproc > 1:
        rates[nproc] = run_world(args, argv, nproc)
    print(
        json.dumps(
            {
                "benchmark": "ddp_throughput",
                "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                "arch": args.arch,
                "image_size": args.image_size,
                "batch_per_rank": args.batch_size,
                "steps": args.steps,
                "rounds": args.rounds,
                "images_per_s_by_world_size": {str(w): round(r, 1) for w, r in rates.items()},
                "scaling_efficiency": round(rates[nproc] / (nproc * rates[1]), 3) if nproc > 1 else None,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
