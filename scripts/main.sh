#!/usr/bin/env bash
# The README's main command: set up, then fine-tune the ImageNet-pretrained MobileNetV2 on a
# Fashion-MNIST subset three ways -- TraDy under a 2.2% memory budget, full fine-tuning and
# classifier only -- and print accuracy, memory and sparsities side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/main}
COMMON=(--model mobilenet_v2 --resolution 128 --data fashion-mnist --train-size 2000 --test-size 1000
        --epochs "${EPOCHS:-3}" --batch-size 32 --warmup-epochs 1 --seed 0 --threads "$(nproc)")
.venv/bin/trady finetune "${COMMON[@]}" --strategy trady --budget 2.2% --lr 0.125 --out "$OUT/trady"
.venv/bin/trady finetune "${COMMON[@]}" --strategy full --lr 0.05 --out "$OUT/full"
.venv/bin/trady finetune "${COMMON[@]}" --strategy classifier --lr 0.125 --out "$OUT/classifier"
.venv/bin/trady report "$OUT" --no-plots
