#!/usr/bin/env bash
# The accuracy benchmark: the paper's strategies on real data (Fashion-MNIST subset), two
# ImageNet-pretrained models, three budgets, three seeds, then the report (tables, paired tests,
# plots). Resumable: finished runs are skipped. `--quick` runs a 4-run smoke version (< 5 min).
#   bash benchmarks/accuracy/run.sh [--quick] [extra trady sweep flags, e.g. --jobs 2]
set -euo pipefail
cd "$(dirname "$0")/../.."
TRADY=${TRADY:-.venv/bin/trady}
GRID=benchmarks/accuracy/grid.json
OUT=benchmarks/accuracy/results
if [ "${1:-}" = "--quick" ]; then
  shift
  GRID=benchmarks/accuracy/grid-quick.json
  OUT=${OUT_QUICK:-runs/accuracy-quick}
fi
"$TRADY" sweep --grid "$GRID" --out "$OUT" --threads 1 "$@"
"$TRADY" report "$OUT" --profile "src/trady/profiles/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["models"][0])' "$GRID").json"
