#!/usr/bin/env bash
# Prepared H200 check (≤ 10 minutes on one H200, install included): installs the CUDA build of JAX and
# this package, runs bench/h200.py, then the serving load test on the demo model (issue 17's c=16 vs
# c=1 throughput, at most 4 minutes; its table goes to OUT's folder as serve_demo.{json,txt}).
# Usage, from anywhere:  bash bench/h200.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/h200.json}"
python -m pip install --quiet -e ".[cuda]"
python -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', f'no GPU: {jax.devices()}'; print(d.device_kind)"
python bench/h200.py --out "$out"
timeout 240 python bench/serve.py --models demo --json "$(dirname "$out")/serve_demo.json" \
  | tee "$(dirname "$out")/serve_demo.txt" || echo "serve bench did not finish (status $?)"
