#!/usr/bin/env bash
# The memory benchmark with CUDA figures (torch.cuda.max_memory_allocated of a step above
# memory_allocated before it), for a machine with a GPU. Prepared, NOT yet run: no GPU was lent to
# the session that wrote it. Run from the repository root:  bash benchmarks/memory/gpu.sh
# Writes benchmarks/memory/results/gpu/*.json and prints the tables; commit what it prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/memory/results/gpu
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to run')"
for model in mobilenet_v2 mcunet-in1; do
  "$PY" -m trady bench memory --model "$model" --resolution 128 --batch-size 32 --budget 2.2% \
    --device cuda --repeats 3 --out "$OUT/$model.json"
done
"$PY" -m trady bench memory --model mobilenet_v2 --resolution 128 --batch-size 32 --budget 2.2% \
  --micro-batch 4 --device cuda --repeats 3 --out "$OUT/mobilenet_v2-micro4.json"
