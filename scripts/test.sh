#!/usr/bin/env bash
# The README's test command: set up, lint, run the default (fast) test suite; then, with no arguments
# (CI), rerun the tests marked `numerics` (float comparisons between two computations) under a second
# CPU kernel set and thread counts, so that a tolerance fitted to one machine's kernels fails here too
# (docs/reliability.md, "Tests that pass on any CPU").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
  numerics() { .venv/bin/python -m pytest -p no:cacheprovider -m "numerics and not slow"; }
  echo "numerics: AVX2 kernels, 2 threads"
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 TRADY_TEST_THREADS=2 numerics
  echo "numerics: default (no vector ISA) kernels, 1 thread"
  ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 TRADY_TEST_THREADS=1 numerics
fi
