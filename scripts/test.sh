#!/usr/bin/env bash
# Set up, then run the formatter check, the linter and the test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
# Two worker processes, each taking whole test files: a file's tests share
# fixtures and compiled steps, and only one process prepares the Fashion-MNIST
# tfds cache. Pass -n 0 to run in this process.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
