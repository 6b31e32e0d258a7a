#!/usr/bin/env bash
# Install alignkit (editable) with the given extras, e.g. `./install.sh demo` or `./install.sh test`.
# PyTorch: an installed recent torch is kept; with none, the CPU build torch==2.13.0 is installed
# (any other version would pull gigabytes of CUDA packages on machines without a local wheel).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[${1:-demo}]"
