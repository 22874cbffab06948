#!/usr/bin/env bash
# Issue 10's model figures on a CUDA machine in one go (about 3-4 minutes on one H200):
#   1. smoke: one tiny CUDA training run through the real Trainer, so a broken CUDA path fails in seconds;
#   2. benchmarks/quality.py: the 3-seed quality benchmark on both splits, its six runs side by side;
#   3. benchmarks/recipe_sweep.py, beside 2: the levers at the quick-cpu recipe's cost, 3 seeds each.
# The 28 px runs are far too small to fill a GPU one at a time, hence the runs side by side.
# Results: smoke.json, quality.json and sweep.json (each one JSON object) with their logs in $RESULTS
# (default out/gpu-quality); the sweep's per-run JSON files in $RESULTS/sweep.
#
#   benchmarks/gpu_quality.sh                    PACK=... RESULTS=... PYTHON=... override the defaults
#   QUALITY_TIMEOUT=480 SWEEP_TIMEOUT=480 benchmarks/gpu_quality.sh
#
# Needs a Python ($PYTHON, else python3) with torch, torchvision, numpy, pandas, scikit-learn, scipy,
# matplotlib and the stages' S3 client and embedded server (boto3, moto[server]). The package is used
# straight from tasks/ (no install needed on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
PACK="${PACK:-../shared/data/ham10000-28px}"
RESULTS="${RESULTS:-out/gpu-quality}"
QUALITY_TIMEOUT="${QUALITY_TIMEOUT:-480}"
SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-480}"
export PYTHONPATH="$PWD/tasks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_quality: error: torch sees no CUDA device" >&2
    exit 2
fi
if [ ! -f "$PACK/HAM10000_metadata.csv" ]; then
    echo "gpu_quality: error: no HAM10000 28 px pack at $PACK (set PACK=...)" >&2
    exit 2
fi
mkdir -p "$RESULTS/sweep"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$RESULTS/gpu.txt" 2>&1 || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    >>"$RESULTS/gpu.txt"

# 1. Also decodes the pack once into the cache the sweep's runs share.
started=$SECONDS
if ! timeout 240 "$PY" benchmarks/recipe_ablation.py --name smoke --device cuda --pack "$PACK" \
    --out "$RESULTS/sweep" --set epochs=1 --set finetune_epochs=1 --set max_train_images=512 \
    >"$RESULTS/smoke.json" 2>"$RESULTS/smoke.log"; then
    echo "gpu_quality: error: the CUDA smoke run failed; the end of its log:" >&2
    tail -n 40 "$RESULTS/smoke.log" >&2
    exit 1
fi
echo "gpu_quality: smoke run passed in $((SECONDS - started)) s" >&2

# 2 and 3, side by side.
# Two loader workers each: six trainings share 16 cores (a worker count changes no result).
timeout "$QUALITY_TIMEOUT" "$PY" benchmarks/quality.py --pack "$PACK" --jobs 6 --train-args "--loader-workers 2" \
    >"$RESULTS/quality.json" 2>"$RESULTS/quality.log" &
quality=$!
timeout "$SWEEP_TIMEOUT" "$PY" benchmarks/recipe_sweep.py --device cuda --jobs 8 --pack "$PACK" \
    --out "$RESULTS/sweep" --timeout "$SWEEP_TIMEOUT" >"$RESULTS/sweep.json" 2>"$RESULTS/sweep.log" &
sweep=$!
status=0
wait "$quality" || { status=$?; echo "gpu_quality: quality.py failed (exit $status; 124: timed out): see $RESULTS/quality.log" >&2; }
wait "$sweep" || { status=$?; echo "gpu_quality: recipe_sweep.py failed (exit $status): see $RESULTS/sweep.json, sweep.log" >&2; }
echo "gpu_quality: done in $((SECONDS - started)) s" >&2
exit "$status"
