#!/usr/bin/env bash
# Set up, then run the local consortium demo (3 hospitals, 2 rounds). Extra args go to `fedseek demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec fedseek demo --out "${FEDSEEK_DEMO_OUT:-demo-out}" "$@"
