#!/usr/bin/env bash
# Set up (scripts/setup.sh demo) and run the demo on real data installed from Debian packages:
# train a resnet8 teacher on Fashion-MNIST, evaluate it, and show the pools the next stages draw from.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
out="${DEMO_OUT:-runs/demo}"
mkdir -p "$out"
set -x
.venv/bin/curate pools
.venv/bin/train teacher --dataset fashion-mnist --arch resnet8 --epochs "${DEMO_EPOCHS:-6}" --out "$out/teacher.pt"
.venv/bin/train eval --model "$out/teacher.pt" --dataset fashion-mnist:test
