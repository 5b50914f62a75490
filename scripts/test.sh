#!/usr/bin/env bash
# Set up (scripts/setup.sh test), lint (ruff, configured in pyproject.toml) and run the whole test suite,
# slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
