#!/usr/bin/env bash
# GPU throughput check: ResNet50 at 224 px, bf16 autocast + channels_last, DermaOps's real training
# loop (cached uint8 tensors on the GPU, augmentation on the GPU) against model-only training steps
# on the same GPU. Prints one JSON object (benchmarks/train_throughput.py) in about 1-3 minutes.
# With more than one GPU a second JSON line follows (benchmarks/ddp_throughput.py): the same loop under
# DistributedDataParallel at world size 1 and N (every GPU, NCCL), images/s and the scaling efficiency.
#
#   benchmarks/gpu_check.sh            on a CUDA machine
#   benchmarks/gpu_check.sh --smoke    tiny sizes on the CPU: proves the script works anywhere
#
# Needs a Python with torch + torchvision + numpy: $PYTHON, else .venv/bin/python, python3, python.
# The package is used straight from tasks/ (no install needed on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch, torchvision, numpy" 2>/dev/null; then
            PY="$candidate"
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: error: no Python with torch, torchvision and numpy found (set PYTHON=...)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/tasks${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--smoke" ]; then
    timeout 600 "$PY" benchmarks/train_throughput.py --device cpu --arch resnet50 --image-size 32 \
        --batch-size 4 --steps 1 --rounds 1
    exec timeout 600 "$PY" benchmarks/ddp_throughput.py --device cpu --world-size 2 --arch resnet18 --image-size 32 \
        --batch-size 4 --steps 2 --rounds 1
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: error: torch sees no CUDA device (use --smoke for the CPU check)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
timeout 300 "$PY" benchmarks/train_throughput.py --device cuda --arch resnet50 --image-size 224 \
    --batch-size 256 --steps 25 --rounds 3 --num-threads 0
GPUS="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [ "$GPUS" -gt 1 ]; then
    exec timeout 900 "$PY" benchmarks/ddp_throughput.py --device cuda --world-size "$GPUS" --arch resnet50 \
        --image-size 224 --batch-size 128 --steps 20 --rounds 3 --timeout 420
fi
echo "gpu_check: one GPU visible: no multi-GPU case" >&2
