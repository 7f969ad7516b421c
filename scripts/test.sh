#!/usr/bin/env bash
# The README's test command: set up, lint, run the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
