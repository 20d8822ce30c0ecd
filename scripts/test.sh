#!/usr/bin/env bash
# Set up, then run lint, type checks, the layering contracts and the whole test suite (unit + end-to-end with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ruff check .
mypy federation node coordinator privacy explain examples
lint-imports --no-logo
python -m pytest -q --durations=40 "$@"
