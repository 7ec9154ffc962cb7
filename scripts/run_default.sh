#!/usr/bin/env bash
# Set up, then train the default config (Fashion-MNIST, 40% symmetric label noise).
# Usage: bash scripts/run_default.sh [workdir] [--config.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-runs/default}"
shift || true
bash scripts/setup.sh
.venv/bin/python -m ddlr.main --config=configs/default.py --workdir="$workdir" "$@"
