#!/usr/bin/env bash
# Set up (scripts/setup.sh demo) and run the demo on real data installed from Debian packages:
# train a resnet8 teacher on half of Fashion-MNIST's training split (the "original data"), score a
# heterogeneous pool that hides the other half among digits, glyphs, emoji, icons, photos and noise,
# select a class-balanced related subset, export it as curated shards, and draw the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
out="${DEMO_OUT:-runs/demo}"
mkdir -p "$out"
set -x
.venv/bin/curate pools
.venv/bin/train teacher --dataset data/pools/fashion-original.toml --test-dataset fashion-mnist:test \
    --arch resnet8 --epochs "${DEMO_EPOCHS:-6}" --out "$out/teacher.pt"
.venv/bin/train eval --model "$out/teacher.pt" --dataset fashion-mnist:test
rm -rf "$out/scored" "$out/selected"  # a new teacher: its scores start from scratch
.venv/bin/curate score --teacher "$out/teacher.pt" --pool data/pools/related-hidden.toml --out "$out/scored"
.venv/bin/curate sql --scored "$out/scored" --example per-source
.venv/bin/curate select --scored "$out/scored" --strategy balanced --budget 20000 --weights class \
    --out "$out/selection.parquet"
.venv/bin/curate export --scored "$out/scored" --selection "$out/selection.parquet" --out "$out/selected"
.venv/bin/curate report --scored "$out/scored" --selection "$out/selection.parquet" --out "$out/report"
