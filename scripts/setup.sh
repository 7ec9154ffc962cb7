#!/usr/bin/env bash
# Create .venv with ddlr's dependencies and install the offline Fashion-MNIST files.
# Usage: bash scripts/setup.sh   (idempotent; reruns are quick)
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt

# Debian's dataset-fashion-mnist package provides the raw Fashion-MNIST files,
# so the default config and the tests need no network access to the dataset.
fashion_dir=/usr/share/datasets/fashion-mnist
if [ ! -f "$fashion_dir/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST files not found in $fashion_dir: install Debian's" \
      "dataset-fashion-mnist package (sudo apt-get install dataset-fashion-mnist)" \
      "or set --config.data.manual_dir to a folder with the four IDX .gz files." >&2
    exit 1
  fi
fi
echo "setup done: .venv ready, Fashion-MNIST files in $fashion_dir"
