#!/usr/bin/env bash
# Set up (scripts/setup.sh demo) and run the experiment on real data installed from Debian packages:
# a resnet8 teacher learns half of Fashion-MNIST; it scores a pool hiding the other half among digits,
# glyphs, emoji, icons, photo patches and noise; selections are exported as curated shards; students
# are distilled from them at an equal budget and compared (pipelines/hetero_distill.py).
# DEMO_PROFILE=quick runs the 3-minute version. Run it again after an interruption: it continues.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
profile="${DEMO_PROFILE:-default}"
out="${DEMO_OUT:-results/$profile}"
set -x
.venv/bin/python -m pipelines.hetero_distill --profile "$profile" --out "$out"
.venv/bin/curate sql --scored "$out/teacher0/scored/pool" --example per-source
