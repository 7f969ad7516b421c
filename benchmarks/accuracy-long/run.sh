#!/usr/bin/env bash
# The long accuracy benchmark (issue 14 item 3): trady, s-topk-random, d-full-random, s-full-random and
# classifier at 2.2% (grid.json), and full fine-tuning with its own lr per model, chosen on a held-out
# split by lr_scan.py (grid-full.json + results/lr_scan.json); mbv2-w0.35 and mcunet-in1, Fashion-MNIST,
# 20 epochs, 5 seeds; then `trady report` (tables, paired tests, plots). Resumable: finished runs are
# skipped.   bash benchmarks/accuracy-long/run.sh [--jobs 2]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=src OMP_NUM_THREADS=1
OUT=benchmarks/accuracy-long/results
# the scan runs once (delete results/lr_scan.json to redo it)
[ -f "$OUT/lr_scan.json" ] || nice -n 15 "$PY" benchmarks/accuracy-long/lr_scan.py
nice -n 15 "$PY" -m trady sweep --grid benchmarks/accuracy-long/grid.json --out "$OUT" --threads 1 --no-progress "$@"
for model in $("$PY" -c 'import json; print(" ".join(json.load(open("benchmarks/accuracy-long/grid.json"))["models"]))'); do
  lr=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["chosen"][sys.argv[2]])' "$OUT/lr_scan.json" "$model")
  nice -n 15 "$PY" -m trady sweep --grid benchmarks/accuracy-long/grid-full.json --models "$model" --set "lr=$lr" \
    --out "$OUT" --threads 1 --no-progress "$@"
done
"$PY" -m trady report "$OUT" --profile src/trady/profiles/mcunet-in1.json
