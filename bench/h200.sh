#!/usr/bin/env bash
# Prepared H200 check (≤ 8 minutes on one H200, install included): installs the CUDA build of JAX and
# this package, then runs bench/h200.py. Usage, from anywhere:  bash bench/h200.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/h200.json}"
python -m pip install --quiet -e ".[cuda]"
python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', f'no GPU: {jax.devices()}'; print(d.device_kind)"
python bench/h200.py --out "$out"
