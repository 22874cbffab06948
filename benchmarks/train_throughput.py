"""Training-loop images/s against model-only images/s; prints one JSON object.

training loop: DermaOps's real Trainer.train_epoch on cached uint8 images already in memory (on the
  device): shuffling, batch gather, augmentation, normalisation, forward, class-weighted loss,
  backward, AdamW step, one-cycle schedule, metric bookkeeping, progress logging.
model only: the same architecture, optimizer, loss and batch size fed one random float batch that
  is already normalised and on the device: forward + backward + step and nothing else.

The ratio says how much the data path costs on top of the model (goal >= 0.9). The two are
measured alternately, several rounds, and the medians are reported, so a neighbour's load on a
shared machine hits both alike. Pixel content does not change speed, so random uint8 images stand
in for the cache (the real cache is the same dtype, layout and device).

    python benchmarks/train_throughput.py                      # the fixed small CPU config
    python benchmarks/train_throughput.py --device cuda --arch resnet50 --image-size 224 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--geometry", default="squash", help="squash, aspect or crop (dermaops.frame)")
    p.add_argument("--stem", default="auto", help="auto = small stem below 40 px, as in training")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="measured steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--num-threads", type=int, default=2, help="torch CPU threads (0 = torch's default)")
    return p.parse_args(argv)


def measure(args) -> dict:
    import torch
    from dermaops.dataset import CLASSES
    from dermaops.frame import Frame
    from dermaops.models import normalize
    from dermaops.training import Split, TrainConfig, Trainer

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.steps * args.batch_size
    gen = torch.Generator().manual_seed(0)
    height, width = Frame(args.geometry, args.image_size).shape
    images = torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
    train = Split.in_memory(images.to(device), labels.to(device))
    cfg = TrainConfig(
        arch=args.arch, image_size=args.image_size, geometry=args.geometry, stem=args.stem,
        pretrained="none", epochs=100,
        finetune_epochs=0, finetune_depth=1, batch_size=args.batch_size, lr=1e-3, finetune_lr=1e-5,
        weight_decay=5e-4, label_smoothing=0.0, class_weights=True, patience=0, seed=0,
    )  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, list(CLASSES), train, train, str(device), Path(tmp), {}, lambda *_: None)
        learn, optimizer, scheduler = trainer.configure(1)

        # Model only: same model object, optimizer and loss; a batch already normalised on the device.
        x = normalize(torch.rand(args.batch_size, 3, height, width, device=device),
                      trainer.meta.mean, trainer.meta.std, channels_last=cuda)  # fmt: skip
        y = labels[: args.batch_size].to(device)

        def model_only() -> float:
            trainer.model.train()
            started = time.monotonic()
            for _ in range(args.steps):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    logits = trainer.model(x)
                loss = trainer.criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            return args.steps * args.batch_size / (time.monotonic() - started)

        def training_loop(epoch: int) -> float:
            return trainer.train_epoch(1, epoch, learn, optimizer, scheduler)["images_per_s"]

        training_loop(0)  # warm-up: allocator, kernels, cuDNN autotuning
        model_only()
        loop_rates, model_rates = [], []
        for r in range(args.rounds):
            loop_rates.append(training_loop(r + 1))
            model_rates.append(model_only())

    loop, model = statistics.median(loop_rates), statistics.median(model_rates)
    return {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "arch": args.arch,
        "image_size": args.image_size,
        "input_shape": [height, width],
        "stem": trainer.meta.stem,
        "batch_size": args.batch_size,
        "bf16_autocast": cuda,
        "channels_last": cuda,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "training_loop_images_per_s": round(loop, 1),
        "model_only_images_per_s": round(model, 1),
        "ratio": round(loop / model, 3),
        "goal_ratio": 0.9,
        "rounds_training_loop": [round(v, 1) for v in loop_rates],
        "rounds_model_only": [round(v, 1) for v in model_rates],
    }


def main(argv=None) -> int:
    result = measure(parse_args(argv))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
