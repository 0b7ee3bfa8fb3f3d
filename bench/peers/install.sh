#!/usr/bin/env bash
# Ultralytics' own environment for train_bench.py's peer, from the hash-checked lock beside
# this script. PyTorch is no part of simple_cnn, its tests or CI, so it lives here, apart.
#   bash bench/peers/install.sh      (makes bench/.peers-venv; about 6 GB, PyTorch's CUDA libraries included)
# A virtual environment cannot be moved once made, so it is built in place and marked complete
# last: peers.py uses none without the mark.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/../.peers-venv"
rm -rf "$venv"
"${PYTHON:-python3.11}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --require-hashes --no-deps -r "$here/requirements.txt"
"$venv/bin/python" -c "import torchvision.ops, ultralytics"  # torchvision's compiled ops load
touch "$venv/complete"
echo "installed $venv"
