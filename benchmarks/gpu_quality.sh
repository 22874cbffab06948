#!/usr/bin/env bash
# Issue 18's GPU figures in one device call of at most 8 minutes (budgeted below; run it whenever a GPU is lent):
#   1. smoke: one tiny CUDA training through the real Trainer on the 200 px pack, so a broken CUDA path fails in
#      seconds (it also decodes the pack once into the cache the sweep's runs share);
#   2. benchmarks/quality.py: both DAG recipes through the real stages, three seeds, the lesion-grouped and the
#      official DermaMNIST split (12 runs side by side): the README's 3-seed tables and issue 18's goals;
#   3. benchmarks/recipe_sweep.py --recipe full-gpu, beside 2: the full-gpu levers (geometry and size, the
#      augmentation policy, ResNet34, class sampling), three seeds each, chosen on validation.
# The runs are small for an H100 one at a time, hence side by side; each has its own timeout so a slow
# machine still returns what finished. Results: gpu.txt, smoke.json, quality.json, sweep.json with their logs
# in $RESULTS (default out/gpu-quality), the sweep's per-run JSON in $RESULTS/sweep.
#
#   benchmarks/gpu_quality.sh                          PACK=... RESULTS=... PYTHON=... override the defaults
#   QUALITY_TIMEOUT=420 SWEEP_TIMEOUT=420 benchmarks/gpu_quality.sh
#
# Needs a Python ($PYTHON, else python3) with torch, torchvision, numpy, pandas, scikit-learn, scipy,
# matplotlib, boto3 and moto[server] (the embedded S3); no Great Expectations (validate is not run). The package
# is used straight from tasks/ (no install needed on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
PACK="${PACK:-../shared/data/ham10000-200px}"
RESULTS="${RESULTS:-out/gpu-quality}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-60}"
QUALITY_TIMEOUT="${QUALITY_TIMEOUT:-400}"
SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-400}"
export PYTHONPATH="$PWD/tasks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_quality: error: torch sees no CUDA device" >&2
    exit 2
fi
if [ ! -f "$PACK/HAM10000_metadata.csv" ]; then
    echo "gpu_quality: error: no HAM10000 200 px pack at $PACK (set PACK=...)" >&2
    exit 2
fi
mkdir -p "$RESULTS/sweep"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$RESULTS/gpu.txt" 2>&1 || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    >>"$RESULTS/gpu.txt"

# 1. The full-gpu frame, so the cache file the sweep's runs read is decoded once, here.
started=$SECONDS
if ! timeout "$SMOKE_TIMEOUT" "$PY" benchmarks/recipe_ablation.py --name smoke --recipe full-gpu --device cuda \
    --pack "$PACK" --out "$RESULTS/sweep" --no-tta --set epochs=1 --set finetune_epochs=1 \
    >"$RESULTS/smoke.json" 2>"$RESULTS/smoke.log"; then
    echo "gpu_quality: error: the CUDA smoke run failed; the end of its log:" >&2
    tail -n 40 "$RESULTS/smoke.log" >&2
    exit 1
fi
echo "gpu_quality: smoke run passed in $((SECONDS - started)) s" >&2

# 2 and 3, side by side: 12 + 24 runs share the card and 16 cores (one loader worker or thread each).
timeout "$QUALITY_TIMEOUT" "$PY" benchmarks/quality.py --pack "$PACK" --jobs 12 --train-args "--loader-workers 1" \
    >"$RESULTS/quality.json" 2>"$RESULTS/quality.log" &
quality=$!
timeout "$SWEEP_TIMEOUT" "$PY" benchmarks/recipe_sweep.py --recipe full-gpu --device cuda --jobs 12 --threads 1 \
    --pack "$PACK" --out "$RESULTS/sweep" --timeout "$SWEEP_TIMEOUT" >"$RESULTS/sweep.json" 2>"$RESULTS/sweep.log" &
sweep=$!
status=0
wait "$quality" || { status=$?; echo "gpu_quality: quality.py failed (exit $status; 124: timed out): see $RESULTS/quality.log" >&2; }
wait "$sweep" || { status=$?; echo "gpu_quality: recipe_sweep.py failed (exit $status): see $RESULTS/sweep.json, sweep.log" >&2; }
echo "gpu_quality: done in $((SECONDS - started)) s" >&2
exit "$status"
