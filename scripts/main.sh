#!/usr/bin/env bash
# The README's main command: set up, then fine-tune the ImageNet-pretrained MobileNetV2 on a
# Fashion-MNIST subset three ways -- TraDy under a 2.2% memory budget, full fine-tuning and
# classifier only -- and print accuracy, memory and sparsities side by side.
# Sizes can be changed: EPOCHS=3 TRAIN_SIZE=1500 TEST_SIZE=500 OUT=runs/main bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/main}
COMMON=(--model mobilenet_v2 --resolution 128 --data fashion-mnist
        --train-size "${TRAIN_SIZE:-1500}" --test-size "${TEST_SIZE:-500}" --epochs "${EPOCHS:-3}"
        --batch-size 32 --warmup-epochs 1 --lr 0.005 --classifier-lr 0.05 --classifier-init zeros
        --seed 0 --threads "$(nproc)")
.venv/bin/trady finetune "${COMMON[@]}" --strategy trady --budget 2.2% --out "$OUT/trady"
.venv/bin/trady finetune "${COMMON[@]}" --strategy full --out "$OUT/full"
.venv/bin/trady finetune "${COMMON[@]}" --strategy classifier --out "$OUT/classifier"
.venv/bin/trady report "$OUT" --no-plots
